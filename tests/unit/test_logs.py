"""JSON log lines carry the scan id while a scan runs."""

from __future__ import annotations

import json
import logging

import pytest

from store.logs import configure_logging, scan_id_var


def test_json_lines_with_scan_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_format=True)
    log = logging.getLogger("antidote.test")
    token = scan_id_var.set("scan-123")
    try:
        log.info("stage done", extra={"stage": "load"})
    finally:
        scan_id_var.reset(token)
    log.info("outside")
    lines = [json.loads(x) for x in capsys.readouterr().err.strip().splitlines()]
    assert lines[0]["message"] == "stage done" and lines[0]["scan_id"] == "scan-123" and lines[0]["stage"] == "load"
    assert lines[0]["level"] == "INFO" and "time" in lines[0]
    assert lines[1]["scan_id"] is None
