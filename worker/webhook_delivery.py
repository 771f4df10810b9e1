"""One try of a scan's webhook, as a plain function (worker/webhooks.py is the thin Celery task around it):
the signed payload, the SSRF-checked request with manual redirects, and the record of the attempt."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from sqlalchemy.orm import Session, sessionmaker

from store import webhooks
from store.models import Scan, as_utc
from store.settings import Settings
from store.webhook_guard import IPAddress, TargetRefused, check_host, resolve_checked

SIGNATURE_HEADER = "X-Antidote-Signature"
DELIVERY_HEADER = "X-Antidote-Delivery"
REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Outcome:
    """What one try ended in; ``retry`` asks the task to try again later."""

    outcome: str  # delivered, retrying, failed, refused; duplicate: the delivery had ended, nothing was sent
    status_code: int | None = None
    error: str | None = None

    @property
    def retry(self) -> bool:
        return self.outcome == "retrying"


def payload(scan: Scan) -> dict[str, Any]:
    """What the receiver gets: enough to act on without a second request, and where the full report is."""
    report = scan.report or {}
    verdict = report.get("verdict")
    if isinstance(verdict, dict):
        verdict = verdict.get("label")
    ended = scan.finished_at or scan.updated_at
    return {
        "event": "scan.ended", "scan_id": scan.id, "status": scan.status, "mode": scan.mode,
        "verdict": verdict, "before": report.get("before"), "after": report.get("after"),
        "error": ({"code": scan.error_code, "message": scan.error_message} if scan.error_code else None),
        "ended_at": as_utc(ended).isoformat() if ended else None,
        "report_url": f"/scans/{scan.id}/report",
    }


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Antidote-Signature`` value: ``t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address resolved and checked once, while the Host header keeps the name."""

    def __init__(self, host: str, port: int, ip: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((str(self._ip), self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the checked address, verified against the URL's host name (SNI and certificate)."""

    def __init__(self, host: str, port: int, ip: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        sock = self.raw_sock = socket.create_connection((str(self._ip), self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(url: str, body: bytes, headers: dict[str, str], settings: Settings) -> int:
    """POST ``body``; every hop (the first and each redirect) is checked against the allowlist and, after
    resolution, its address. Returns the final status code; raises TargetRefused or OSError."""
    for _hop in range(settings.webhook_max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TargetRefused(f"redirect to a non-http(s) URL {url[:200]!r}")
        if parts.username is not None or parts.password is not None:
            raise TargetRefused("redirect to a URL with credentials")
        host = parts.hostname
        check_host(host, settings.webhook_host_patterns)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ip = resolve_checked(host, port, settings.webhook_allow_private, settings.webhook_timeout_s)
        cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
        conn = cls(host, port, ip, settings.webhook_timeout_s)
        deadline = _Deadline(conn, settings.webhook_timeout_s)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            with deadline:  # the socket timeout bounds each read, not a status line and headers sent byte by byte
                conn.request("POST", path, body=body, headers={**headers, "Content-Type": "application/json",
                                                                "User-Agent": "antidote-webhooks"})
                response = conn.getresponse()
            if deadline.expired:  # the cut can read as the end of the headers: the answer is not trusted
                raise TimeoutError("cut at the deadline")
            status, location = response.status, response.getheader("Location")
            _drain(response, settings.webhook_max_response_bytes, settings.webhook_timeout_s)
        except (http.client.HTTPException, ssl.SSLError, OSError) as exc:
            if deadline.expired:
                raise OSError(f"the receiver did not answer within ANTIDOTE_WEBHOOK_TIMEOUT_S="
                              f"{settings.webhook_timeout_s:g} s") from exc
            if isinstance(exc, OSError):
                raise
            raise OSError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()
        if status not in REDIRECTS or not location:
            return status
        url = urljoin(url, location)
    raise TargetRefused(f"more than {settings.webhook_max_redirects} redirects "
                        "(ANTIDOTE_WEBHOOK_MAX_REDIRECTS)")


class _Deadline:
    """While entered, cuts ``conn``'s socket once ``seconds`` have passed (a receiver that drips its status line
    or headers a byte per socket timeout, or its TLS handshake, would otherwise hold the worker for as long as
    it likes); the blocked read then fails and ``expired`` says why."""

    def __init__(self, conn: _PinnedHTTP | _PinnedHTTPS, seconds: float) -> None:
        self.conn, self.expired = conn, False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def _cut(self) -> None:
        self.expired = True
        sock = self.conn.raw_sock
        if sock is not None:
            # the plain socket's shutdown (not SSLSocket's, which would unwrap): wakes the blocked read
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._timer.cancel()


def _drain(response: http.client.HTTPResponse, max_bytes: int, max_s: float) -> None:
    """Read a bounded part of the answer, in bytes and in time (a receiver dripping a byte per socket
    timeout would otherwise hold the worker); only the status matters."""
    deadline, left = time.monotonic() + max_s, max_bytes
    while left > 0 and time.monotonic() < deadline:
        chunk = response.read(min(left, 8192))
        if not chunk:
            return
        left -= len(chunk)


def attempt_delivery(sessions: sessionmaker[Session], settings: Settings, scan_id: str, delivery_id: str,
                     attempt: int) -> Outcome:
    """Try once and record it. 2xx: delivered; refused targets and other 4xx: final; 408, 429, 5xx and
    network errors: retried until ANTIDOTE_WEBHOOK_MAX_ATTEMPTS. A delivery that has already ended (its task
    sent twice: the outbox is at least once) is not tried nor recorded again."""
    with sessions() as session:
        if webhooks.final_outcome(session, scan_id, delivery_id) is not None:
            return Outcome("duplicate")
        scan = session.get(Scan, scan_id)
        if scan is None or not (scan.spec.get("notify") or {}).get("url"):
            return Outcome("failed", error="the scan or its notify.url is gone")
        url = scan.spec["notify"]["url"]
        body = json.dumps(payload(scan), separators=(",", ":"), sort_keys=True).encode()
        secret = webhooks.webhook_secret(session, scan.tenant_id)
    headers = {SIGNATURE_HEADER: sign(secret, int(time.time()), body), DELIVERY_HEADER: delivery_id}
    last = attempt >= settings.webhook_max_attempts
    started = time.monotonic()
    try:
        status = post(url, body, headers, settings)
        if 200 <= status < 300:
            result = Outcome("delivered", status)
        elif status in (408, 429) or status >= 500:
            result = Outcome("failed" if last else "retrying", status, f"the receiver answered {status}")
        else:
            result = Outcome("failed", status, f"the receiver answered {status}")
    except TargetRefused as exc:
        result = Outcome("refused", error=str(exc))
    except OSError as exc:
        result = Outcome("failed" if last else "retrying", error=_printable(f"{type(exc).__name__}: {exc}")[:500])
    duration_ms = (time.monotonic() - started) * 1000
    with sessions() as session:
        webhooks.record_attempt(session, scan_id, delivery_id, attempt, url, result.status_code, result.error,
                                duration_ms, result.outcome)
    return result


def _printable(text: str) -> str:
    """``text`` with every unprintable character escaped (``\\x00``): an error can quote the receiver's own bytes
    (``BadStatusLine`` holds its status line), and a NUL in the attempt's record failed its write to PostgreSQL."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def retry_delay_s(settings: Settings, attempt: int) -> float:
    """Exponential backoff: the pause after try ``attempt`` (1-based) is base * 2^(attempt-1)."""
    return settings.webhook_retry_base_s * 2 ** (attempt - 1)
