"""Structured JSON logs; every record made while a scan runs carries its id."""

from __future__ import annotations

import contextvars
import logging
import sys

from pythonjsonlogger.json import JsonFormatter

scan_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("scan_id", default=None)


class _ScanIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.scan_id = scan_id_var.get()
        return True


def configure_logging(level: str = "INFO", json_format: bool = True) -> None:
    """Replace the root handler with one writing JSON lines (or plain text) to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ScanIdFilter())
    if json_format:
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(scan_id)s",
                                           rename_fields={"levelname": "level", "asctime": "time"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(scan_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
