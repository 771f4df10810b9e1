"""The webhook outbox on the embedded default: a scan canceled while queued is notified, a webhook whose ender
died before sending it is sent by the API's sweep, each once, and a task sent twice posts once. The tasks are
read back from the real folder broker and run with the function the Celery task runs (no worker process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.routes.webhooks import send_unsent_webhooks
from store import repository, webhooks
from store.db import make_engine, make_session_factory, upgrade_database
from store.models import Scan, ScanStatus, Tenant
from store.queue import DELIVER_WEBHOOK, make_celery
from store.settings import Settings
from tests.webhook_receiver import Receiver
from worker.webhook_delivery import DELIVERY_HEADER, attempt_delivery
from worker.webhooks import send_after_run


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"data_dir": tmp_path / "data", "database_url": None, "broker_url": None,
                            "storage_url": None, "log_json": False, "webhook_allowed_hosts": "127.0.0.1",
                            "webhook_allow_private": True, "webhook_timeout_s": 2.0, "stale_sweep_interval_s": 0}
    settings = Settings(**{**base, **kw})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.resolved_database_url)
    return settings


def _sessions(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings.resolved_database_url))


def _queued_scan(sessions: sessionmaker[Session], url: str | None, tenant: str = "acme") -> tuple[str, str]:
    """(scan id, tenant's key) of a queued scan, with ``notify.url`` when ``url`` is given."""
    with sessions() as session:
        key = repository.create_api_key(session, tenant)
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        scan_id = repository.new_id()
        spec: dict[str, Any] = {"mode": "scan", **({"notify": {"url": url}} if url else {})}
        repository.add_scan(session, scan_id, tenant_id, "scan", spec, {})
    return scan_id, key


def _webhook_tasks(settings: Settings) -> list[list[Any]]:
    """Take every webhook task out of the folder broker's queue: the arguments each was sent with."""
    celery = make_celery(settings)
    found = []
    with celery.connection_for_read() as conn:
        queue = conn.SimpleQueue(settings.resolved_webhook_queue, no_ack=True)
        while True:
            try:
                message = queue.get(block=False)
            except queue.Empty:
                break
            if message.headers.get("task") == DELIVER_WEBHOOK:
                found.append(list(message.payload[0]))
        queue.close()
    return found


def _row(sessions: sessionmaker[Session], scan_id: str) -> Scan:
    with sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None
        session.expunge(scan)
        return scan


def test_a_scan_canceled_while_queued_gets_its_webhook_once(tmp_path: Path, receiver: Receiver) -> None:
    from api.app import create_app

    settings = _settings(tmp_path)
    sessions = _sessions(settings)
    scan_id, key = _queued_scan(sessions, receiver.url + "/hook")
    quiet, _ = _queued_scan(sessions, None, tenant="quiet")  # no notify.url: nothing to send
    delivery_id = _row(sessions, scan_id).webhook_delivery_id
    assert delivery_id and _row(sessions, quiet).webhook_delivery_id is None
    with TestClient(create_app(settings)) as client:
        r = client.delete(f"/scans/{scan_id}", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 202 and r.json()["status"] == "canceled"
    tasks = _webhook_tasks(settings)
    assert tasks == [[scan_id, delivery_id, 1]]
    assert _row(sessions, scan_id).webhook_queued_at is not None
    # the worker's later delivery of the scan task finds it ended and already sent: nothing more
    assert send_after_run(make_celery(settings), sessions, scan_id, settings.resolved_webhook_queue) is None
    assert send_unsent_webhooks(_App(settings, sessions)) == [] and _webhook_tasks(settings) == []
    result = attempt_delivery(sessions, settings, *tasks[0])
    assert result.outcome == "delivered" and len(receiver.requests) == 1
    path, headers, body = receiver.requests[0]
    assert path == "/hook" and headers[DELIVERY_HEADER] == delivery_id and b'"status":"canceled"' in body


class _App:
    """What ``send_unsent_webhooks`` reads of the FastAPI app: its state."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.state = type("State", (), {"settings": settings, "sessions": sessions,
                                        "celery": make_celery(settings)})()


def test_a_webhook_its_ender_did_not_send_is_sent_by_the_sweep(tmp_path: Path, receiver: Receiver) -> None:
    """The worker recorded the scan's end and died before queueing the webhook: the end itself is the outbox
    record, the sweep sends it after the grace, once, with the delivery id fixed at creation; the task sent a
    second time (at least once) finds the delivery over and posts nothing."""
    settings = _settings(tmp_path, webhook_sweep_grace_s=3600)
    sessions = _sessions(settings)
    scan_id, _ = _queued_scan(sessions, receiver.url)
    with sessions() as session:
        assert repository.claim_scan(session, scan_id, 3) is not None
        assert repository.finish_scan(session, scan_id, {"before": {"acc": 0.9}}, {}, {})  # ... and it died here
    assert send_unsent_webhooks(_App(settings, sessions)) == []  # within the grace the ender may still send it
    assert _webhook_tasks(settings) == []
    now = settings.model_copy(update={"webhook_sweep_grace_s": 0.0})
    time.sleep(0.01)
    assert send_unsent_webhooks(_App(now, sessions)) == [scan_id]
    assert send_unsent_webhooks(_App(now, sessions)) == []  # sent is sent
    tasks = _webhook_tasks(settings)
    assert tasks == [[scan_id, _row(sessions, scan_id).webhook_delivery_id, 1]]
    assert attempt_delivery(sessions, settings, *tasks[0]).outcome == "delivered"
    assert attempt_delivery(sessions, settings, *tasks[0]).outcome == "duplicate"
    assert len(receiver.requests) == 1
    with sessions() as session:
        assert [a.outcome for a in webhooks.attempts_of(session, scan_id)] == ["delivered"]


def test_the_apis_sweep_loop_sends_unsent_webhooks(tmp_path: Path) -> None:
    """The lifespan's periodic sweep runs the outbox sweep too (every ANTIDOTE_STALE_SWEEP_INTERVAL_S)."""
    from api.app import create_app

    settings = _settings(tmp_path, stale_sweep_interval_s=0.2, webhook_sweep_grace_s=0.0)
    sessions = _sessions(settings)
    scan_id, _ = _queued_scan(sessions, "http://127.0.0.1:9/hook")
    with sessions() as session:
        repository.end_scan(session, scan_id, ScanStatus.failed, "internal_error", "the worker died")
    with TestClient(create_app(settings)):
        deadline = time.monotonic() + 20
        while _row(sessions, scan_id).webhook_queued_at is None and time.monotonic() < deadline:
            time.sleep(0.1)
    assert _row(sessions, scan_id).webhook_queued_at is not None
    assert [t[0] for t in _webhook_tasks(settings)] == [scan_id]


def test_the_migration_fills_in_verdicts_and_delivery_ids(tmp_path: Path) -> None:
    """Rows written before 0003: the verdict from the report, a delivery id for an unfinished scan that wants a
    webhook (an ended one counts as notified already)."""
    from alembic import command

    from store.db import alembic_config

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    command.upgrade(alembic_config(url), "0002")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', '2026-12-01')")
        for sid, status, spec, report in (
                ("ended", "succeeded", '{"notify": {"url": "http://x/"}}',
                 '{"verdict": {"label": "suspicious", "score": 0.5}}'),
                ("waiting", "queued", '{"notify": {"url": "http://x/"}}', None),
                ("plain", "running", '{}', None)):
            conn.exec_driver_sql(
                "INSERT INTO scans (id, tenant_id, status, mode, progress, spec, inputs, artifacts, report, timings,"
                " attempts, cancel_requested, created_at, updated_at) VALUES (?, 't', ?, 'scan', 0, ?, '{}', '{}',"
                " ?, '{}', 0, 0, '2026-12-01', '2026-12-01')", (sid, status, spec, report))
    command.upgrade(alembic_config(url), "head")
    with make_session_factory(engine)() as session:
        rows = {s.id: (s.verdict_label, s.verdict_score, s.webhook_delivery_id is not None)
                for s in session.scalars(select(Scan))}
    engine.dispose()
    assert rows == {"ended": ("suspicious", 0.5, False), "waiting": (None, None, True), "plain": (None, None, False)}


def test_an_embedded_restart_queues_unfinished_deliveries_again(tmp_path: Path) -> None:
    """`antidote serve` empties the folder broker when it starts: a delivery still waiting there (sent, not
    over) is queued again with its id; one that ended is not."""
    from cli.serve import redeliver_unfinished

    settings = _settings(tmp_path)
    sessions = _sessions(settings)
    waiting, _ = _queued_scan(sessions, "http://127.0.0.1:9/a")
    done, _ = _queued_scan(sessions, "http://127.0.0.1:9/b", tenant="other")
    with sessions() as session:
        for scan_id in (waiting, done):
            repository.end_scan(session, scan_id, ScanStatus.canceled)
    celery = make_celery(settings)
    for scan_id in (waiting, done):
        assert send_after_run(celery, sessions, scan_id, settings.resolved_webhook_queue) is not None
    with sessions() as session:
        webhooks.record_attempt(session, done, _row(sessions, done).webhook_delivery_id or "", 1, "u", 200, None,
                                1.0, "delivered")
    assert redeliver_unfinished(settings) == 0  # no unfinished scan; the folder was emptied
    assert _webhook_tasks(settings) == [[waiting, _row(sessions, waiting).webhook_delivery_id, 1]]
    assert _row(sessions, waiting).webhook_queued_at is not None and _row(sessions, done).webhook_queued_at
