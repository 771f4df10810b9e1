"""One error shape for every answer that is not a success: ``{"detail": "...", "field": ...}``, and a JSON
500 carrying a request id (also sent as ``X-Request-ID`` and written in the exception's log line)."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import psycopg
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlPoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("antidote.api")
# a client's own id is kept when it is short and plain, so that it can be matched against its logs
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ErrorOut(BaseModel):
    """The body of every error answer."""

    detail: str
    field: str | None = None
    request_id: str | None = None
    # a refused code-carrying checkpoint: the static inspection's high findings
    findings: list[dict[str, Any]] | None = None


class ApiError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None, findings: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field, self.headers = status, detail, field, headers
        self.findings = findings


def error_response(status: int, detail: str, field: str | None = None,
                   headers: dict[str, str] | None = None, request_id: str | None = None) -> JSONResponse:
    body: dict[str, object] = {"detail": detail}
    if field is not None:
        body["field"] = field
    if request_id is not None:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)


def request_id_of(request: Request) -> str | None:
    """The id ``ErrorShield`` gave this request (None for an app used without it)."""
    return getattr(request.state, "request_id", None)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.status >= 500:  # a 5xx carries the request id, and the log line says why under the same id
        rid = request_id_of(request)
        log.warning("answered %d: %s (request_id=%s)", exc.status, exc.detail, rid, extra={"request_id": rid})
        return error_response(exc.status, exc.detail, exc.field, exc.headers, request_id=rid)
    response = error_response(exc.status, exc.detail, exc.field, exc.headers)
    if exc.findings is not None:
        response = JSONResponse({"detail": exc.detail, "field": exc.field, "findings": exc.findings},
                                status_code=exc.status, headers=exc.headers)
    return response


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405 and any ``HTTPException``: the same shape, the detail always a string; a 405's
    ``Allow`` lists every method of the path (Starlette names only those of the first route it matched)."""
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(exc.status_code, detail, headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route_methods
    return sorted(methods)


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for a bad path or query parameter: the first problem, named by its field."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return error_response(422, "invalid request")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body", "header")]
    field = ".".join(loc) or None
    return error_response(422, f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg")),
                          field)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _CLIENT_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class ErrorShield:
    """Plain ASGI middleware: an ``X-Request-ID`` on every answer, and any exception that escapes the app
    becomes a JSON 500 naming that id (logged with it) instead of uvicorn's plain-text body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("latin-1"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request_id=%s)", scope["method"], scope["path"], request_id,
                          extra={"request_id": request_id})
            if started:  # the answer is half sent: only closing the connection can tell the client
                raise
            response = JSONResponse({"detail": "internal error; quote the request id when you report it",
                                     "request_id": request_id}, status_code=500)
            await response(scope, receive, send_with_id)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing, invalid or revoked API key"},
    422: {"model": ErrorOut, "description": "a parameter is invalid; the answer names the field"},
    500: {"model": ErrorOut, "description": "an unexpected error; the answer carries the request id"},
    503: {"model": ErrorOut, "description": "a dependency is down or the service is saturated; see Retry-After"},
}


# --- a dependency that does not answer: 503 + Retry-After, never a 500 --------------------------------------

DATABASE_DOWN_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, SqlPoolTimeout,
                                                     psycopg.OperationalError, psycopg.InterfaceError)


async def database_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    """The database refused, dropped or timed out the connection (down, restarting, failing over, pool
    exhausted): the request may succeed later, so say so instead of a 500; the pool's pre-ping reconnects by
    itself once it is back."""
    rid = request_id_of(request)
    log.warning("database unavailable: %s: %s (request_id=%s)", type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "", rid, extra={"path": request.url.path, "request_id": rid})
    retry_after = str(request.app.state.settings.dependency_retry_after_s)
    return error_response(503, "the database is unavailable; try again in a few seconds",
                          headers={"Retry-After": retry_after}, request_id=rid)
