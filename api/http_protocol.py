"""uvicorn's httptools protocol with the limits it lacks for a fresh request: a cap on the bytes of a
request head (431) and a time limit for the head to arrive (a connection that sends nothing, or its headers
byte by byte, is closed instead of being held for ever).

httptools (llhttp) rather than h11: h11 caps the head (``h11_max_incomplete_event_size``) but parses in
Python, several times slower per request on the GET paths that clients poll; llhttp has no head cap of its
own, so the cap is counted here, at most one read (256 KiB) past the limit before the answer."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from store.settings import Settings, get_settings


@dataclass(frozen=True)
class HeadLimits:
    max_header_bytes: int
    header_timeout_s: float
    linger_s: float = 1.0  # after a refusal, bytes still arriving are read and dropped this long

    @classmethod
    def of(cls, settings: Settings) -> HeadLimits:
        return cls(settings.max_header_bytes, settings.header_timeout_s)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus the head's byte cap and time limit (``ANTIDOTE_MAX_HEADER_BYTES``,
    ``ANTIDOTE_HEADER_TIMEOUT_S``). ``limits`` is set by ``antidote serve``; a process started without it
    (uvicorn's worker processes) reads the same settings from the environment.

    Kept off the common path: a head that arrives within one read costs no timer and no counting unless
    the read itself is bigger than the cap."""

    limits: HeadLimits | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._limits = type(self).limits or HeadLimits.of(get_settings())
        self._in_head = True  # a fresh connection waits for its first head
        self._head_bytes = 0  # bytes of reads that ended with the head still incomplete
        self._big_read = False  # this read could hold a whole head over the cap: count its pieces
        self._parsed_head = 0
        self._head_too_big = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: drop the bytes so that closing does not reset the answer
        self._big_read = self._head_bytes + len(data) > self._limits.max_header_bytes
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():  # the head goes on past this read
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes:
                self._refuse_big_head()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._parsed_head = True, 0, 0

    def on_url(self, url: bytes) -> None:
        if self._big_read:
            self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._big_read:
            self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, n: int) -> None:
        """A whole head inside one big read is counted by its pieces; raising stops the parser."""
        self._parsed_head += n
        if self._parsed_head > self._limits.max_header_bytes:
            self._head_too_big = True
            raise ValueError("request head too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error: JSON, and a 431 when the error was our head cap."""
        if self._head_too_big:
            self._refuse_big_head()
        else:
            self._refuse(400, msg)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0 and self.cycle is None:
            self.transport.close()  # never said a word: nobody to answer
        else:
            self._refuse(408, f"request head not received within {self._limits.header_timeout_s:g} s "
                              "(ANTIDOTE_HEADER_TIMEOUT_S)")

    def _refuse_big_head(self) -> None:
        self._refuse(431, f"request head over {self._limits.max_header_bytes} bytes (ANTIDOTE_MAX_HEADER_BYTES)")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer in the API's error shape, stop parsing, and close after a short linger."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._cancel_head_timer()
        body = json.dumps({"detail": detail}).encode()
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self._limits.linger_s, self.transport.close)
