"""Early answers that reach the client, and stalled uploads that end.

An answer given before the request body is read (401 from the key check, 413 from a ``Content-Length``
over the limit, 415, 422, 503) is followed by uvicorn closing the socket while a client such as ``urllib``
is still sending: the kernel then resets the connection and the client sees ``Connection reset by peer``
instead of the answer. So, before the answer's first byte, the rest of the body is read and thrown away, up
to a bound of bytes and time (uvicorn's ``receive()`` returns ``http.disconnect`` once the response is
complete, so the draining must come first), and the answer says ``Connection: close``. A client that sent
``Expect: 100-continue`` and whose body was never asked for is not drained: uvicorn sends ``100 Continue``
only on the first ``receive()``, so that client is still waiting and reads the early answer as it is."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CLOSE = (b"connection", b"close")
# a Content-Length of more digits than this is over every limit anyway; int() of thousands of digits is refused
# (Python's 4,300-digit bound) or slow, so a longer one is read as no valid length
MAX_LENGTH_DIGITS = 19


def content_length(value: bytes | str | None) -> int | None:
    """A ``Content-Length`` header's value when it is 1 to 19 ASCII digits, else ``None`` (no valid length):
    ``str.isdigit`` alone passes '²' and other digits ``int`` refuses, a 500 where the client sent a bad header."""
    if value is None:
        return None
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return int(raw) if raw.isdigit() and len(raw) <= MAX_LENGTH_DIGITS else None  # bytes.isdigit: ASCII only


@dataclass
class _Body:
    """What the app has received of one request body."""

    declared: int | None
    expects_continue: bool
    received: int = 0
    asked: bool = False
    complete: bool = False
    ended: bool = False  # disconnected or timed out: nothing more will come


def _body_of(scope: Scope) -> _Body | None:
    """The request's body framing, or ``None`` for a request without a body (most GETs: no overhead)."""
    declared: int | None = None
    has_body = expects = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            declared = content_length(value)
            has_body = value != b"0"
        elif name == b"transfer-encoding":
            has_body = True
        elif name == b"expect":
            expects = value.lower() == b"100-continue"
    return _Body(declared, expects) if has_body else None


class BodyGuard:
    """Plain ASGI middleware (``BaseHTTPMiddleware`` would buffer and cost more): drains the unread body
    before an early answer, and ends an upload that sends nothing for ``read_timeout_s``."""

    def __init__(self, app: ASGIApp, drain_max_bytes: int, drain_timeout_s: float, read_timeout_s: float) -> None:
        self.app = app
        self.drain_max_bytes, self.drain_timeout_s, self.read_timeout_s = (drain_max_bytes, drain_timeout_s,
                                                                           read_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = _body_of(scope) if scope["type"] == "http" else None
        if body is None:
            await self.app(scope, receive, send)
            return

        async def guarded_receive() -> Message:
            if body.complete or body.ended:
                return await receive()  # e.g. a streaming answer listening for the client to leave
            body.asked = True
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    message = await receive()
            except TimeoutError:
                body.ended = True
                return {"type": "http.disconnect", "reason": "body read timeout"}
            self._note(body, message)
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body.complete:
                if not body.ended and (body.asked or not body.expects_continue):
                    await self._drain(receive, body)
                message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)

    @staticmethod
    def _note(body: _Body, message: Message) -> None:
        if message["type"] == "http.request":
            body.received += len(message.get("body", b""))
            body.complete = not message.get("more_body", False)
        else:
            body.ended = True

    async def _drain(self, receive: Receive, body: _Body) -> None:
        """Read and discard the rest of the body; give up (the client may then see a reset) past the bounds."""
        if body.declared is not None and body.declared - body.received > self.drain_max_bytes:
            return
        start = body.received
        try:
            async with asyncio.timeout(self.drain_timeout_s):
                while not body.complete and not body.ended and body.received - start <= self.drain_max_bytes:
                    self._note(body, await receive())
        except TimeoutError:
            body.ended = True
