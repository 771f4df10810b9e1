"""``multipart/form-data`` read straight off the socket into temp files, with the size limits enforced as
the bytes arrive (Starlette's own form parser would spool a whole oversized upload before we could refuse)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from api.body_guard import content_length
from api.errors import ApiError
from core.ranges import has_control_character

SPEC_MAX_BYTES = 64 * 1024
# one header line of a part (its Content-Disposition carries the filename): python-multipart's own default, stated
MAX_PART_HEADER_BYTES = 4096 + 128
# a filename is stored with the scan and shown to clients: the longest name common file systems allow (NAME_MAX)
MAX_FILENAME_CHARS = 255


@dataclass
class ReceivedFile:
    path: Path
    filename: str
    size: int
    sha256: str


@dataclass
class ReceivedForm:
    files: dict[str, ReceivedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    total_bytes: int = 0


@dataclass
class PartRule:
    max_bytes: int
    is_file: bool


@dataclass
class _Part:
    """The part being parsed: its headers, then its bytes (into a temp file, or a buffer for a text field)."""

    headers: dict[str, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    size: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    file: IO[bytes] | None = None
    path: Path | None = None
    buffer: bytearray = field(default_factory=bytearray)

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()


class MultipartReceiver:
    """The parser's callbacks as methods over typed state; the first problem found is kept and raised."""

    def __init__(self, rules: dict[str, PartRule], tmp_dir: Path) -> None:
        self.rules, self.tmp_dir = rules, tmp_dir
        self.form = ReceivedForm()
        self.error: ApiError | None = None
        self._part = _Part()
        self._header_field, self._header_value = b"", b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end}

    def fail(self, error: ApiError) -> None:
        if self.error is None:
            self.error = error

    def on_part_begin(self) -> None:
        self._part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers[self._header_field.decode("latin-1").lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        part = self._part
        _, disp = parse_options_header(part.headers.get("content-disposition", b""))
        part.name = disp.get(b"name", b"").decode("utf-8", "replace")
        filename = disp.get(b"filename")
        part.filename = os.path.basename(filename.decode("utf-8", "replace")) if filename else None
        rule = self.rules.get(part.name)
        if rule is None:
            self.fail(ApiError(422, f"unknown part {part.name!r}; expected some of: {', '.join(self.rules)}",
                               field=part.name))
        elif part.name in self.form.files or part.name in self.form.fields:
            self.fail(ApiError(422, f"part {part.name!r} was sent twice", field=part.name))
        elif rule.is_file and not part.filename:
            self.fail(ApiError(422, f"part {part.name!r} must be a file with a filename", field=part.name))
        elif rule.is_file and has_control_character(part.filename or ""):
            # stored with the scan (jsonb refuses a NUL: the INSERT failed with a 500) and shown to clients
            self.fail(ApiError(422, f"part {part.name!r} has a filename with a control character "
                                    f"{(part.filename or '')[:200]!r}", field=part.name))
        elif rule.is_file and len(part.filename or "") > MAX_FILENAME_CHARS:
            self.fail(ApiError(422, f"part {part.name!r} has a filename of {len(part.filename or '')} characters, "
                                    f"over the {MAX_FILENAME_CHARS} a filename may have", field=part.name))
        elif rule.is_file:
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{part.name}-")
            part.file, part.path = os.fdopen(fd, "wb"), Path(tmp)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        rule = self.rules.get(part.name)
        if self.error is not None or rule is None:
            return
        chunk = data[start:end]
        part.size += len(chunk)
        if part.size > rule.max_bytes:
            self.fail(ApiError(413, f"part {part.name!r} is over its limit of {rule.max_bytes} bytes",
                               field=part.name))
        elif part.file is not None:
            part.file.write(chunk)
            part.digest.update(chunk)
        else:
            part.buffer += chunk

    def on_part_end(self) -> None:
        part = self._part
        part.close()
        if self.error is not None or part.name not in self.rules:
            return
        if part.path is not None:
            self.form.files[part.name] = ReceivedFile(part.path, part.filename or "", part.size,
                                                      part.digest.hexdigest())
            return
        try:
            self.form.fields[part.name] = part.buffer.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(ApiError(422, f"part {part.name!r} is not UTF-8 text", field=part.name))

    def close(self) -> None:
        """Close the temp file of a part cut off by an error (the caller removes ``tmp_dir``)."""
        self._part.close()


def check_form_headers(request: Request, max_total: int) -> bytes:
    """The boundary of a ``multipart/form-data`` body no longer than ``max_total``; 415/413 otherwise.

    Runs before a byte of the body is read, so that the early answer needs no body at all."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(415, "POST /scans takes multipart/form-data", field="content-type")
    if not 1 <= len(params[b"boundary"]) <= MAX_BOUNDARY_LENGTH:  # the parser raised on a longer one: a 500
        raise ApiError(415, f"the multipart boundary must be 1 to {MAX_BOUNDARY_LENGTH} characters (RFC 2046 "
                            f"allows 70), got {len(params[b'boundary'])}", field="content-type")
    declared = declared_length(request)
    if declared is not None and declared > max_total:
        raise ApiError(413, f"upload of {declared} bytes is over the limit of {max_total} bytes",
                       field="content-length")
    return params[b"boundary"]


def declared_length(request: Request) -> int | None:
    """The body's ``Content-Length`` when the client sent a valid one."""
    return content_length(request.headers.get("content-length"))


async def receive_form(request: Request, rules: dict[str, PartRule], max_total: int, tmp_dir: Path,
                       on_bytes: Callable[[int], None] | None = None) -> ReceivedForm:
    """Parse the body into files under ``tmp_dir`` and small text fields; raises ``ApiError`` 408/413/415/422.

    ``on_bytes`` sees every chunk's size before it is written (the spool budget refuses there)."""
    boundary = check_form_headers(request, max_total)
    receiver = MultipartReceiver(rules, tmp_dir)
    parser = MultipartParser(boundary, receiver.callbacks(), max_header_count=16,
                             max_header_size=MAX_PART_HEADER_BYTES)
    form = receiver.form
    try:
        async for chunk in request.stream():
            form.total_bytes += len(chunk)
            if form.total_bytes > max_total:
                raise ApiError(413, f"upload is over the limit of {max_total} bytes")
            if on_bytes is not None:
                on_bytes(len(chunk))
            parser.write(chunk)
            if receiver.error is not None:
                raise receiver.error
        parser.finalize()
    except ApiError:
        raise
    except ClientDisconnect as exc:  # the client left, or sent nothing for ANTIDOTE_BODY_READ_TIMEOUT_S
        raise ApiError(408, "the upload stopped before its end: the client left or sent nothing for "
                            f"{request.app.state.settings.body_read_timeout_s:g} s") from exc
    except Exception as exc:  # the parser's own errors: a malformed body
        if "header size" in str(exc):  # which part cannot be told: its name is in the line that was too long
            raise ApiError(422, f"malformed multipart body: a part's header line is over {MAX_PART_HEADER_BYTES} "
                                f"bytes (a filename of at most {MAX_FILENAME_CHARS} characters fits)") from exc
        raise ApiError(422, f"malformed multipart body: {exc}") from exc
    finally:
        receiver.close()
    if receiver.error is not None:
        raise receiver.error
    return form
