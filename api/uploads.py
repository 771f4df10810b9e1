"""``multipart/form-data`` read straight off the socket into temp files, with the size limits enforced as
the bytes arrive (Starlette's own form parser would spool a whole oversized upload before we could refuse)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

SPEC_MAX_BYTES = 64 * 1024


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


class _Part:
    def __init__(self) -> None:
        self.headers: dict[str, bytes] = {}
        self.name: str | None = None
        self.filename: str | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self.file = None  # type: ignore[var-annotated]
        self.path: Path | None = None
        self.buffer = bytearray()


async def receive_form(request: Request, rules: dict[str, PartRule], max_total: int, tmp_dir: Path) -> ReceivedForm:
    """Parse the body into files under ``tmp_dir`` and small text fields; raises ``ApiError`` 413/415/422."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(415, "POST /scans takes multipart/form-data")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_total:
        raise ApiError(413, f"upload of {int(declared)} bytes is over the limit of {max_total} bytes")

    form = ReceivedForm()
    state: dict[str, object] = {"part": None, "field": b"", "value": b"", "error": None}

    def fail(error: ApiError) -> None:
        if state["error"] is None:
            state["error"] = error

    def on_part_begin() -> None:
        state["part"] = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] = bytes(state["field"]) + data[start:end]  # type: ignore[operator]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] = bytes(state["value"]) + data[start:end]  # type: ignore[operator]

    def on_header_end() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        part.headers[bytes(state["field"]).decode("latin-1").lower()] = bytes(state["value"])  # type: ignore[arg-type]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        _, disp = parse_options_header(part.headers.get("content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        filename = disp.get(b"filename")
        part.name = name
        part.filename = os.path.basename(filename.decode("utf-8", "replace")) if filename else None
        rule = rules.get(name)
        if rule is None:
            fail(ApiError(422, f"unknown part {name!r}; expected some of: {', '.join(rules)}", field=name))
            return
        if name in form.files or name in form.fields:
            fail(ApiError(422, f"part {name!r} was sent twice", field=name))
            return
        if rule.is_file:
            if not part.filename:
                fail(ApiError(422, f"part {name!r} must be a file with a filename", field=name))
                return
            fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f"{name}-")
            part.file, part.path = os.fdopen(fd, "wb"), Path(tmp)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        if state["error"] is not None or part.name not in rules:
            return
        chunk = data[start:end]
        part.size += len(chunk)
        rule = rules[part.name]
        if part.size > rule.max_bytes:
            fail(ApiError(413, f"part {part.name!r} is over its limit of {rule.max_bytes} bytes", field=part.name))
            return
        if part.file is not None:
            part.file.write(chunk)
            part.digest.update(chunk)
        else:
            part.buffer += chunk

    def on_part_end() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        if part.file is not None:
            part.file.close()
        if state["error"] is not None or part.name not in rules:
            return
        if part.path is not None:
            form.files[part.name] = ReceivedFile(part.path, part.filename or "", part.size, part.digest.hexdigest())
        else:
            try:
                form.fields[part.name] = part.buffer.decode("utf-8")
            except UnicodeDecodeError:
                fail(ApiError(422, f"part {part.name!r} is not UTF-8 text", field=part.name))

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    }, max_header_count=16)
    try:
        async for chunk in request.stream():
            form.total_bytes += len(chunk)
            if form.total_bytes > max_total:
                raise ApiError(413, f"upload is over the limit of {max_total} bytes")
            parser.write(chunk)
            if state["error"] is not None:
                raise state["error"]  # type: ignore[misc]
        parser.finalize()
    except ApiError:
        raise
    except Exception as exc:  # the parser's own errors: a malformed body
        raise ApiError(422, f"malformed multipart body: {exc}") from exc
    finally:
        part = state["part"]
        if isinstance(part, _Part) and part.file is not None and not part.file.closed:
            part.file.close()
    if state["error"] is not None:
        raise state["error"]  # type: ignore[misc]
    return form
