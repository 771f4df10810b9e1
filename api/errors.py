"""One error shape for every answer that is not a success: ``{"detail": "...", "field": ...}``."""

from __future__ import annotations

import logging

import psycopg
from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlPoolTimeout

log = logging.getLogger("antidote.api")


class ApiError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field, self.headers = status, detail, field, headers


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    body: dict[str, object] = {"detail": exc.detail}
    if exc.field is not None:
        body["field"] = exc.field
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


# --- a dependency that does not answer: 503 + Retry-After, never a 500 --------------------------------------

DATABASE_DOWN_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, SqlPoolTimeout,
                                                     psycopg.OperationalError, psycopg.InterfaceError)


async def database_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    """The database refused, dropped or timed out the connection (down, restarting, failing over, pool
    exhausted): the request may succeed later, so say so instead of a 500; the pool's pre-ping reconnects by
    itself once it is back."""
    log.warning("database unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                extra={"path": request.url.path})
    retry_after = str(request.app.state.settings.dependency_retry_after_s)
    return JSONResponse({"detail": "the database is unavailable; try again in a few seconds"},
                        status_code=503, headers={"Retry-After": retry_after})
