"""BodyGuard on its own, with an ASGI server's receive/send played by queues: what is drained, when, and
what is left alone (the end-to-end proof with real clients is tests/e2e/test_http_limits.py)."""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope, Send

from api.body_guard import BodyGuard


async def _early_401(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _scope(*headers: tuple[bytes, bytes]) -> Scope:
    return {"type": "http", "method": "POST", "path": "/scans", "headers": list(headers)}


class _Client:
    """Feeds the body in chunks and records what the app received and sent, in order."""

    def __init__(self, chunks: list[bytes], stall_after: int | None = None) -> None:
        self.chunks, self.stall_after = chunks, stall_after
        self.events: list[str] = []

    async def receive(self) -> Message:
        i = sum(e == "body" for e in self.events)
        if self.stall_after is not None and i >= self.stall_after:
            await asyncio.sleep(3600)
        self.events.append("body")
        return {"type": "http.request", "body": self.chunks[i], "more_body": i < len(self.chunks) - 1}

    async def send(self, message: Message) -> None:
        self.events.append(message["type"])
        if message["type"] == "http.response.start":
            self.start = message


def _run(app, client: _Client, scope: Scope, **limits: float) -> None:  # type: ignore[no-untyped-def]
    guard = BodyGuard(app, **{"drain_max_bytes": 10_000, "drain_timeout_s": 5, "read_timeout_s": 5, **limits})
    asyncio.run(guard(scope, client.receive, client.send))


def test_an_unread_body_is_drained_before_the_early_answer() -> None:
    client = _Client([b"x" * 1000] * 5)
    _run(_early_401, client, _scope((b"content-length", b"5000")))
    assert client.events == ["body"] * 5 + ["http.response.start", "http.response.body"]
    assert (b"connection", b"close") in client.start["headers"]


def test_a_client_waiting_for_100_continue_is_answered_without_draining() -> None:
    client = _Client([b"x" * 1000] * 5)
    _run(_early_401, client, _scope((b"content-length", b"5000"), (b"expect", b"100-continue")))
    assert client.events == ["http.response.start", "http.response.body"]  # receive() never asked: no 100
    assert (b"connection", b"close") in client.start["headers"]


def test_a_rest_over_the_drain_bound_is_not_read() -> None:
    client = _Client([b"x" * 1000] * 50)
    _run(_early_401, client, _scope((b"content-length", b"50000")))
    assert client.events == ["http.response.start", "http.response.body"]


def test_a_request_without_a_body_passes_untouched() -> None:
    client = _Client([])
    _run(_early_401, client, {"type": "http", "method": "GET", "path": "/", "headers": []})
    assert client.events == ["http.response.start", "http.response.body"]
    assert (b"connection", b"close") not in client.start["headers"]


def test_a_stalled_body_reads_as_a_disconnect_after_the_read_timeout() -> None:
    seen: list[Message] = []

    async def reader(scope: Scope, receive: Receive, send: Send) -> None:
        while (message := await receive())["type"] == "http.request":
            seen.append(message)
        seen.append(message)
        await _early_401(scope, receive, send)

    client = _Client([b"x" * 100] * 5, stall_after=2)
    _run(reader, client, _scope((b"content-length", b"500")), read_timeout_s=0.2)
    assert [m["type"] for m in seen] == ["http.request", "http.request", "http.disconnect"]
    assert client.events[-2:] == ["http.response.start", "http.response.body"]  # answered, not drained


def test_a_content_length_is_read_only_from_a_few_ascii_digits() -> None:
    """'²' (latin-1 0xb2) passes str.isdigit and int() refuses it, and int() refuses 5,000 digits: both were a 500
    from a bad header; now they read as no valid length (the body's own size is then what the limits count)."""
    from starlette.requests import Request

    from api.body_guard import content_length
    from api.uploads import declared_length

    assert content_length(b"5000") == 5000 and content_length("12") == 12 and content_length(None) is None
    for bad in (b"\xb2", "²", b"9" * 5000, b"-1", b"+5", b" 5", b"", b"1e3", "٣"):
        assert content_length(bad) is None, bad
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"\xb2")]}
    assert declared_length(Request(scope)) is None
