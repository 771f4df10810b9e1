"""Webhooks against a real HTTP receiver on loopback: signature, retries, SSRF refusals, and their records."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.spec import NotifySpec
from store import repository, webhooks
from store.db import make_engine, make_session_factory, upgrade_database
from store.models import Scan, ScanStatus, Tenant
from store.settings import Settings
from store.webhook_guard import TargetRefused, check_address, check_host
from tests.webhook_receiver import Receiver
from worker.webhook_delivery import DELIVERY_HEADER, SIGNATURE_HEADER, attempt_delivery, retry_delay_s


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(url)
    return make_session_factory(make_engine(url))


def _settings(tmp_path: Path, **kw: object) -> Settings:
    base: dict[str, object] = {"data_dir": tmp_path, "webhook_allowed_hosts": "127.0.0.1",
                               "webhook_allow_private": True, "webhook_retry_base_s": 0.0,
                               "webhook_timeout_s": 2.0}
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


def _ended_scan(sessions: sessionmaker[Session], url: str, tenant: str = "acme") -> str:
    with sessions() as session:
        repository.create_api_key(session, tenant)
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        scan_id = repository.new_id()
        repository.add_scan(session, scan_id, tenant_id, "scan", {"mode": "scan", "notify": {"url": url}}, {})
        scan = session.get(Scan, scan_id)
        scan.status, scan.report = ScanStatus.succeeded.value, {"before": {"acc": 0.9, "asr": 0.99}}
        scan.finished_at = scan.updated_at
        session.commit()
    return scan_id


def _attempts(sessions: sessionmaker[Session], scan_id: str) -> list[tuple[int, str, int | None]]:
    with sessions() as session:
        return [(a.attempt, a.outcome, a.status_code) for a in webhooks.attempts_of(session, scan_id)]


def test_the_signature_verifies_with_the_tenants_secret(tmp_path: Path, sessions, receiver: Receiver) -> None:
    scan_id = _ended_scan(sessions, receiver.url + "/hook?x=1")
    result = attempt_delivery(sessions, _settings(tmp_path), scan_id, "d-1", 1)
    assert result.outcome == "delivered" and result.status_code == 200
    path, headers, body = receiver.requests[0]
    assert path == "/hook?x=1" and headers[DELIVERY_HEADER] == "d-1"
    with sessions() as session:
        secret = webhooks.secret_for_tenant_name(session, "acme", rotate=False)
    assert secret is not None and secret.startswith("whsec_")
    fields = dict(part.split("=", 1) for part in headers[SIGNATURE_HEADER].split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    wrong = hmac.new(b"whsec_other", f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert fields["v1"] != wrong
    sent = json.loads(body)
    assert sent["scan_id"] == scan_id and sent["status"] == "succeeded" and sent["mode"] == "scan"
    assert sent["before"] == {"acc": 0.9, "asr": 0.99} and sent["report_url"] == f"/scans/{scan_id}/report"
    assert sent["error"] is None and sent["ended_at"]
    assert _attempts(sessions, scan_id) == [(1, "delivered", 200)]


def test_rotating_the_secret_changes_it(sessions) -> None:  # type: ignore[no-untyped-def]
    _ended_scan(sessions, "http://127.0.0.1:9/")
    with sessions() as session:
        first = webhooks.secret_for_tenant_name(session, "acme", rotate=False)
        assert webhooks.secret_for_tenant_name(session, "acme", rotate=False) == first
        assert webhooks.secret_for_tenant_name(session, "acme", rotate=True) != first
        assert webhooks.secret_for_tenant_name(session, "nobody", rotate=False) is None


def test_a_receiver_failing_twice_gets_the_third_attempt(tmp_path: Path, sessions, receiver: Receiver) -> None:
    receiver.script = [(500, {}), (503, {})]
    scan_id = _ended_scan(sessions, receiver.url)
    settings = _settings(tmp_path)
    attempt, result = 1, attempt_delivery(sessions, settings, scan_id, "d-2", 1)
    while result.retry:
        attempt += 1
        result = attempt_delivery(sessions, settings, scan_id, "d-2", attempt)
    assert result.outcome == "delivered" and len(receiver.requests) == 3
    assert _attempts(sessions, scan_id) == [(1, "retrying", 500), (2, "retrying", 503), (3, "delivered", 200)]
    assert {r[1][DELIVERY_HEADER] for r in receiver.requests} == {"d-2"}


def test_retries_stop_at_the_last_attempt_and_back_off_exponentially(tmp_path: Path, sessions,
                                                                      receiver: Receiver) -> None:
    receiver.script = [(500, {})] * 3
    scan_id = _ended_scan(sessions, receiver.url)
    settings = _settings(tmp_path, webhook_max_attempts=2, webhook_retry_base_s=10.0)
    assert attempt_delivery(sessions, settings, scan_id, "d", 1).retry
    assert attempt_delivery(sessions, settings, scan_id, "d", 2).outcome == "failed"
    assert [retry_delay_s(settings, n) for n in (1, 2, 3)] == [10.0, 20.0, 40.0]
    receiver.script = [(404, {})]
    assert attempt_delivery(sessions, _settings(tmp_path), scan_id, "e", 1).outcome == "failed"  # 4xx is final


def test_a_host_not_allowed_is_refused_and_recorded(tmp_path: Path, sessions, receiver: Receiver) -> None:
    scan_id = _ended_scan(sessions, receiver.url)
    result = attempt_delivery(sessions, _settings(tmp_path, webhook_allowed_hosts="hooks.example.com"),
                              scan_id, "d", 1)
    assert result.outcome == "refused" and "ANTIDOTE_WEBHOOK_ALLOWED_HOSTS" in (result.error or "")
    assert receiver.requests == [] and _attempts(sessions, scan_id) == [(1, "refused", None)]
    assert attempt_delivery(sessions, _settings(tmp_path, webhook_allowed_hosts=""), scan_id, "d2", 1).outcome \
        == "refused"


def test_loopback_is_refused_unless_private_addresses_are_allowed(tmp_path: Path, sessions,
                                                                  receiver: Receiver) -> None:
    scan_id = _ended_scan(sessions, receiver.url)
    result = attempt_delivery(sessions, _settings(tmp_path, webhook_allow_private=False), scan_id, "d", 1)
    assert result.outcome == "refused" and "127.0.0.1 is not public" in (result.error or "")
    assert receiver.requests == []
    localhost = _ended_scan(sessions, receiver.url.replace("127.0.0.1", "localhost"), tenant="other")
    result = attempt_delivery(sessions, _settings(tmp_path, webhook_allowed_hosts="localhost",
                                                  webhook_allow_private=False), localhost, "d", 1)
    assert result.outcome == "refused" and "not public" in (result.error or "")  # checked after resolution
    assert receiver.requests == []


@pytest.mark.parametrize("location,why", [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://10.0.0.1/", "not in ANTIDOTE_WEBHOOK_ALLOWED_HOSTS"),
    ("http://evil.example.net/", "not in ANTIDOTE_WEBHOOK_ALLOWED_HOSTS"),
    ("file:///etc/passwd", "non-http(s)"),
])
def test_a_redirect_to_a_refused_target_is_refused(tmp_path: Path, sessions, receiver: Receiver,
                                                   location: str, why: str) -> None:
    """Each hop is checked again; metadata addresses stay refused even when named and private ranges allowed."""
    receiver.script = [(302, {"Location": location})]
    scan_id = _ended_scan(sessions, receiver.url)
    settings = _settings(tmp_path, webhook_allowed_hosts="127.0.0.1,169.254.169.254,fd00:ec2::254")
    result = attempt_delivery(sessions, settings, scan_id, "d", 1)
    assert result.outcome == "refused" and why in (result.error or "")
    assert len(receiver.requests) == 1  # only the first hop was called
    assert _attempts(sessions, scan_id) == [(1, "refused", None)]


def test_redirects_are_followed_to_an_allowed_target_and_capped(tmp_path: Path, sessions,
                                                                receiver: Receiver) -> None:
    receiver.script = [(307, {"Location": "/next"})]
    scan_id = _ended_scan(sessions, receiver.url + "/first")
    assert attempt_delivery(sessions, _settings(tmp_path), scan_id, "d", 1).outcome == "delivered"
    assert [r[0] for r in receiver.requests] == ["/first", "/next"]
    receiver.script = [(302, {"Location": "/loop"})] * 5
    result = attempt_delivery(sessions, _settings(tmp_path, webhook_max_redirects=2), scan_id, "d2", 1)
    assert result.outcome == "refused" and "redirects" in (result.error or "")


def _raw_receiver(answer: Callable[[socket.socket], None]) -> tuple[socket.socket, str]:
    """A one-shot receiver on a bare socket (to send what no HTTP server would): reads the request, then
    ``answer(conn)`` writes the bytes."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            with contextlib.suppress(OSError):  # the client cut the connection: what the drip test is about
                answer(conn)

    threading.Thread(target=serve, daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}/hook"


def _dripping_receiver(stop: threading.Event) -> tuple[socket.socket, str]:
    """A receiver that answers its status line, then one header byte every 0.2 s for as long as it is let."""

    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        while not stop.wait(0.2):
            conn.sendall(b"x")
        conn.sendall(b"\r\nContent-Length: 0\r\n\r\n")

    return _raw_receiver(drip)


def test_a_receiver_dripping_its_headers_is_cut_off_at_the_timeout(tmp_path: Path, sessions) -> None:
    """Each read was bounded by the socket timeout, not the whole answer: a byte every 0.2 s held the try (and
    the worker) for as long as the receiver liked, then counted as delivered."""
    stop = threading.Event()
    server, url = _dripping_receiver(stop)
    timer = threading.Timer(8.0, stop.set)  # the receiver ends its headers after 8 s
    timer.start()
    try:
        started = time.monotonic()
        result = attempt_delivery(sessions, _settings(tmp_path, webhook_timeout_s=1.0), _ended_scan(sessions, url),
                                  "d", 1)
        took = time.monotonic() - started
    finally:
        stop.set()
        timer.cancel()
        server.close()
    assert result.outcome == "retrying" and "ANTIDOTE_WEBHOOK_TIMEOUT_S=1 s" in (result.error or ""), result
    assert took < 3.0


def test_a_name_whose_lookup_hangs_is_given_up_at_the_timeout(tmp_path: Path, sessions,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver's DNS is its own too: a lookup that takes 30 s (a resolver that never answers) held the try
    for the resolver's whole timeout, past ANTIDOTE_WEBHOOK_TIMEOUT_S. The resolver is replaced here by one that
    sleeps (the machine's own cannot be pointed at a silent server)."""
    import store.webhook_guard as guard

    release = threading.Event()

    def hanging(*_args: object, **_kw: object) -> list:
        release.wait(30.0)
        raise socket.gaierror(socket.EAI_AGAIN, "gave up")

    monkeypatch.setattr(guard.socket, "getaddrinfo", hanging)
    scan_id = _ended_scan(sessions, "http://slow-dns.example/hook")
    started = time.monotonic()
    try:
        result = attempt_delivery(sessions, _settings(tmp_path, webhook_allowed_hosts="slow-dns.example",
                                                      webhook_timeout_s=0.5), scan_id, "d", 1)
    finally:
        release.set()
    assert time.monotonic() - started < 3.0
    assert result.outcome == "retrying" and "resolving 'slow-dns.example' took more than 0.5 s" in (
        result.error or ""), result


def test_an_error_quoting_the_receivers_bytes_is_recorded_printable(tmp_path: Path, sessions) -> None:
    """http.client's BadStatusLine quotes the receiver's status line: a NUL there went into the attempt's record,
    which PostgreSQL refuses (the write failed, the try went unrecorded)."""
    server, url = _raw_receiver(lambda conn: conn.sendall(b"HTTP/1.1 2\x0000 OK\x1b[2J\r\n\r\n"))
    scan_id = _ended_scan(sessions, url)
    try:
        result = attempt_delivery(sessions, _settings(tmp_path), scan_id, "d", 1)
    finally:
        server.close()
    assert result.outcome == "retrying" and "BadStatusLine" in (result.error or ""), result
    with sessions() as session:
        (recorded,) = webhooks.attempts_of(session, scan_id)
    assert recorded.error is not None and "\\x00" in recorded.error
    assert all(c.isprintable() for c in recorded.error), recorded.error


@pytest.mark.parametrize("ip,private_ok", [("10.1.2.3", True), ("192.168.0.1", True), ("::1", True),
                                            ("fe80::1", True), ("::ffff:127.0.0.1", True), ("224.0.0.1", True),
                                            ("100.64.0.1", True), ("0.0.0.0", True)])
def test_non_public_addresses_need_the_operators_consent(ip: str, private_ok: bool) -> None:
    with pytest.raises(TargetRefused):
        check_address(ipaddress.ip_address(ip), allow_private=False)
    check_address(ipaddress.ip_address(ip), allow_private=private_ok)


@pytest.mark.parametrize("ip", ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"])
def test_metadata_addresses_are_always_refused(ip: str) -> None:
    with pytest.raises(TargetRefused, match="metadata"):
        check_address(ipaddress.ip_address(ip), allow_private=True)


def test_public_addresses_and_host_patterns() -> None:
    check_address(ipaddress.ip_address("93.184.215.14"), allow_private=False)
    check_host("Hooks.Example.COM.", ["*.example.com"])
    with pytest.raises(TargetRefused):
        check_host("example.com.evil.net", ["*.example.com"])


def test_a_host_that_is_no_dns_name_is_refused_at_submission_and_at_a_redirect(tmp_path: Path, sessions,
                                                                            receiver: Receiver) -> None:
    """Before: the pattern *.example.com let x..example.com through; the worker's lookup raised UnicodeError (no
    OSError), so the delivery task failed without recording an attempt the tenant could read."""
    for host in ("x..example.com", "a" * 64 + ".example.com"):
        with pytest.raises(TargetRefused, match="is not a valid DNS name"):
            check_host(host, ["*.example.com"])
    receiver.script = [(302, {"Location": "http://x..example.com/"})]
    scan_id = _ended_scan(sessions, receiver.url)
    result = attempt_delivery(sessions, _settings(tmp_path, webhook_allowed_hosts="127.0.0.1,*.example.com"),
                              scan_id, "d", 1)
    assert result.outcome == "refused" and "not a valid DNS name" in (result.error or "")
    assert _attempts(sessions, scan_id) == [(1, "refused", None)]


@pytest.mark.parametrize("url,error", [("ftp://example.com/x", "http:// or https://"),
                                       ("https://user:pw@example.com/", "credentials"),
                                       ("https://token@example.com/", "credentials"),
                                       ("https://example.com/" + "a" * 2100, "longer than"),
                                       ("https:///path", "no host"), ("https://example.com/a b", "spaces"),
                                       ("https://example.com:99999/", "port")])
def test_the_spec_refuses_bad_notify_urls(url: str, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        NotifySpec(url=url)
    assert NotifySpec(url="https://hooks.example.com/antidote?x=1").url.endswith("x=1")


def test_the_cli_prints_and_rotates_the_webhook_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from store.settings import get_settings

    for name in ("ANTIDOTE_DATABASE_URL", "ANTIDOTE_BROKER_URL", "ANTIDOTE_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTIDOTE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        assert runner.invoke(app, ["keys", "webhook-secret", "--tenant", "ci"]).exit_code == 2  # no such tenant
        assert runner.invoke(app, ["keys", "create", "--tenant", "ci"]).exit_code == 0
        first = runner.invoke(app, ["keys", "webhook-secret", "--tenant", "ci"])
        again = runner.invoke(app, ["keys", "webhook-secret", "--tenant", "ci"])
        rotated = runner.invoke(app, ["keys", "webhook-secret", "--tenant", "ci", "--rotate"])
        assert first.exit_code == 0 and first.stdout.startswith("whsec_") and again.stdout == first.stdout
        assert rotated.exit_code == 0 and rotated.stdout.startswith("whsec_") and rotated.stdout != first.stdout
    finally:
        get_settings.cache_clear()
