"""``antidote serve`` on loopback against the clients people use and the ones that misbehave: an early
401/413 reaches urllib, http.client, httpx and curl (with and without ``Expect: 100-continue``); idle and
slow connections, oversized heads and stalled uploads end with a JSON answer or a close, never held."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.workers import wait_for

MAX_UPLOAD = 4 * 1024**2
BIG = 24 * 1000**2  # the 24 MB upload
BOUNDARY = "antidote-test-boundary"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One ``antidote serve`` (embedded default) with small limits, so that each one is quick to reach."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ANTIDOTE_")}
        self.env.update({"ANTIDOTE_DATA_DIR": str(root / "data"), "ANTIDOTE_DEVICE": "cpu",
                         "ANTIDOTE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "ANTIDOTE_HEADER_TIMEOUT_S": "1.5",
                         "ANTIDOTE_BODY_READ_TIMEOUT_S": "1.5", "ANTIDOTE_MAX_HEADER_BYTES": "16384",
                         "ANTIDOTE_LOG_JSON": "false"})
        self.log = root / "serve.log"
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(self.port)],
                                     env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, 90, 0.25, f"the server to be ready (log: {self.log})")
        created = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "--tenant", "http"],
                                 env=self.env, capture_output=True, text=True, timeout=60, check=True)
        self.key = created.stdout.strip()

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(self.log.read_text()[-3000:])
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stored_objects(self) -> list[Path]:
        objects = self.root / "data" / "objects"
        return [p for p in objects.rglob("*") if p.is_file()] if objects.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("http-limits"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def upload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24 MB multipart body: a ``model`` file part of random bytes."""
    path = tmp_path_factory.mktemp("upload") / "body.bin"
    with open(path, "wb") as f:
        f.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"; filename="m.pt"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode())
        f.write(os.urandom(BIG))
        f.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return path


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _urllib(url: str, key: str, body: Path) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(f"{url}/scans", data=body.read_bytes(), method="POST", headers=_headers(key))
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _http_client(url: str, key: str, body: Path) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    try:
        with open(body, "rb") as f:  # streamed from the file, in 8 KiB blocks
            conn.request("POST", "/scans", body=f, headers={**_headers(key),
                                                            "Content-Length": str(body.stat().st_size)})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _httpx(url: str, key: str, body: Path) -> tuple[int, dict[str, object]]:
    with open(body, "rb") as f:
        r = httpx.post(f"{url}/scans", content=f, timeout=60,
                       headers={**_headers(key), "Content-Length": str(body.stat().st_size)})
    return r.status_code, r.json()


def _curl(expect: bool) -> Callable[[str, str, Path], tuple[int, dict[str, object]]]:
    def run(url: str, key: str, body: Path) -> tuple[int, dict[str, object]]:
        # curl sends Expect: 100-continue for a body this big unless told not to
        args = ["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}", "--data-binary", f"@{body}",
                *(x for k, v in _headers(key).items() for x in ("-H", f"{k}: {v}")), f"{url}/scans"]
        if not expect:
            args[1:1] = ["-H", "Expect:"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        text, _, code = out.stdout.rpartition("\n")
        return int(code), json.loads(text)
    return run


CLIENTS = {"urllib": _urllib, "http.client": _http_client, "httpx": _httpx, "curl-expect": _curl(True),
           "curl-no-expect": _curl(False)}
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
@pytest.mark.timeout(300)
@pytest.mark.parametrize("client", list(CLIENTS))
def test_early_answers_reach_every_client(server: Server, upload: Path, client: str) -> None:
    send = CLIENTS[client]
    status, body = send(server.url, "adk_not-a-key", upload)
    assert (status, body["detail"]) == (401, "invalid or revoked API key")
    status, body = send(server.url, server.key, upload)
    assert status == 413 and f"over the limit of {MAX_UPLOAD} bytes" in str(body["detail"])
    assert server.stored_objects() == []  # the drained bytes were thrown away, never stored
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


@needs_curl
def test_a_chunked_upload_over_the_limit_is_413_mid_stream(server: Server, upload: Path) -> None:
    args = ["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}", "-H", "Transfer-Encoding: chunked",
            "-H", "Expect:", "--data-binary", f"@{upload}",
            *(x for k, v in _headers(server.key).items() for x in ("-H", f"{k}: {v}")), f"{server.url}/scans"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=90)
    text, _, code = out.stdout.rpartition("\n")
    assert (code, json.loads(text)["detail"]) == ("413", f"upload is over the limit of {MAX_UPLOAD} bytes")
    assert server.stored_objects() == []


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_answer(sock: socket.socket, timeout: float) -> bytes:
    """One answer off a kept-alive connection: the head, then ``Content-Length`` bytes."""
    sock.settimeout(timeout)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _json_answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        t0 = time.monotonic()
        assert _read_all(sock, 10) == b""  # closed, without an answer nobody asked for
        assert 1.0 < time.monotonic() - t0 < 5


def test_a_head_sent_too_slowly_is_408(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        t0 = time.monotonic()
        for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n"):
            sock.sendall(piece)
            time.sleep(0.6)
        status, body = _json_answer(_read_all(sock, 10))
        assert status == 408 and "ANTIDOTE_HEADER_TIMEOUT_S" in str(body["detail"])
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("pieces", [1, 40], ids=["one-read", "many-reads"])
def test_a_head_over_the_cap_is_431(server: Server, pieces: int) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        step = len(head) // pieces + 1
        for i in range(0, len(head), step):
            sock.sendall(head[i:i + step])
        status, body = _json_answer(_read_all(sock, 10))
    assert status == 431 and "ANTIDOTE_MAX_HEADER_BYTES" in str(body["detail"])
    small = httpx.get(f"{server.url}/healthz", headers={"X-Fine": "a" * 8000}, timeout=5)
    assert small.status_code == 200 and small.headers["x-request-id"]


def test_a_stalled_upload_is_408(server: Server) -> None:
    head = (f"POST /scans HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n"
            f"--{BOUNDARY}\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        t0 = time.monotonic()
        status, body = _json_answer(_read_all(sock, 10))
    assert status == 408 and "sent nothing for 1.5 s" in str(body["detail"])
    assert 1.0 < time.monotonic() - t0 < 5


def test_unknown_paths_and_methods_answer_the_error_shape(server: Server) -> None:
    missing = httpx.get(f"{server.url}/nope", timeout=5)
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    assert len(missing.headers["x-request-id"]) == 32
    wrong = httpx.put(f"{server.url}/healthz", timeout=5)
    assert wrong.status_code == 405 and wrong.json() == {"detail": "Method Not Allowed"}
    mine = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "ci-run-42"}, timeout=5)
    assert mine.headers["x-request-id"] == "ci-run-42"


def test_a_slow_but_steady_upload_is_not_cut_off(server: Server) -> None:
    """The read timeout is per silence, not per upload: 3 s of body in 0.5 s steps (timeout 1.5 s) is read."""
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{{}}\r\n--{BOUNDARY}--\r\n'
            ).encode()
    head = (f"POST /scans HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        step = len(body) // 6 + 1
        for i in range(0, len(body), step):
            time.sleep(0.5)
            sock.sendall(body[i:i + step])
        status, answer = _json_answer(_read_answer(sock, 10))
    assert (status, answer["field"]) == (422, "model")  # read to the end and judged: the model part is missing


def test_a_kept_alive_connection_gets_the_head_limit_again(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_answer(sock, 5).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the second head never ends
        t0 = time.monotonic()
        status, body = _json_answer(_read_all(sock, 10))
    assert status == 408 and time.monotonic() - t0 < 5
