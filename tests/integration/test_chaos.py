"""Faults in the real components (a private PostgreSQL and Redis, so that they may be stopped; the API; a
supervised Celery worker): the API answers 503, never 500, while a dependency is down and recovers by itself;
every scan ends ``succeeded`` and none runs twice. The long soak is ``bench/chaos_bench.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from bench.chaos_harness import (
    SPEC,
    ChaosEnv,
    Outcome,
    kill_with_redis_restart,
    postgres_restarts,
    redis_restarts,
    scan_parts,
    worker_kills,
)
from store.models import Scan

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosEnv]:
    with ChaosEnv(tmp_path_factory.mktemp("chaos")) as env:
        yield env


def _logs(env: ChaosEnv) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((env.root / "logs").glob("*.log")))


def _all_succeeded_once(out: Outcome, env: ChaosEnv) -> None:
    fig = out.figures
    assert fig.succeeded == fig.submitted and fig.lost == 0, (fig, _logs(env))
    assert fig.duplicated == 0, fig


def _scan_rows(env: ChaosEnv) -> int:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(env.pg.url, poolclass=NullPool)
    with engine.connect() as conn:
        n = conn.scalar(select(func.count()).select_from(Scan))
    engine.dispose()
    return int(n or 0)


def test_database_down_is_a_503_naming_it_and_the_api_recovers(chaos: ChaosEnv) -> None:
    scan_id = chaos.submit(1, scan_parts())[0]
    chaos.pg.stop()
    try:
        ready = chaos.client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert ready.json()["checks"]["database"].startswith("error") and ready.json()["checks"]["broker"] == "ok"
        got = chaos.client.get(f"/scans/{scan_id}", headers=chaos.auth)
        assert got.status_code == 503 and got.headers["retry-after"] == "5"
        assert "database is unavailable" in got.json()["detail"]
        assert got.json()["request_id"] == got.headers["x-request-id"]  # a 5xx names its request id
        listed = chaos.client.get("/scans", headers=chaos.auth)
        assert listed.status_code == 503 and listed.headers["content-type"] == "application/json"
    finally:
        chaos.pg.start()
    assert chaos.client.get("/readyz").status_code == 200  # the pool reconnects: no restart of the API
    assert chaos.client.get(f"/scans/{scan_id}", headers=chaos.auth).status_code == 200


def test_broker_down_refuses_new_scans_with_503_and_stores_nothing(chaos: ChaosEnv) -> None:
    before = _scan_rows(chaos)
    chaos.redis.stop()
    try:
        ready = chaos.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("error")
        r = chaos.client.post("/scans", headers=chaos.auth, files=scan_parts(), data={"spec": SPEC})
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and "queue" in r.json()["detail"]
        assert _scan_rows(chaos) == before
    finally:
        chaos.redis.start()
    assert chaos.client.get("/readyz").status_code == 200


@pytest.mark.timeout(240)
def test_postgres_restart_while_scans_are_queued_and_polled(chaos: ChaosEnv) -> None:
    out = postgres_restarts(chaos, n=20, restarts=1, down_s=3.0)
    _all_succeeded_once(out, chaos)
    codes = out.figures.status_codes
    assert set(codes) <= {"200", "503"}, codes  # never a 500
    assert int(codes.get("503", 0)) > 0 and out.outage_503_s[0] >= 1.0  # the outage was seen, and answered 503
    assert all(p.retry_after == "5" and "database" in p.body["detail"] for p in out.polls if p.status == 503)
    assert {p.status for p in out.refused} <= {503}  # submissions during the outage: 503, or accepted and run
    assert out.figures.resent == 0  # every task was still in Redis: the recovery sent nothing twice


@pytest.mark.timeout(240)
def test_redis_restart_loses_queued_tasks_and_the_api_sends_them_again(chaos: ChaosEnv) -> None:
    out = redis_restarts(chaos, n=20, restarts=1, down_s=3.0)
    _all_succeeded_once(out, chaos)
    assert set(out.figures.status_codes) == {"200"}  # reading scans needs no broker
    assert out.refused and {p.status for p in out.refused} == {503}  # submissions during the outage
    assert out.figures.resent > 0  # tasks really were lost with Redis' memory, and recovered


@pytest.mark.timeout(300)
def test_worker_sigkilled_repeatedly_every_scan_succeeds_once(chaos: ChaosEnv) -> None:
    # 3 kills keep this under a minute on 2 cores; the 20-kill soak is bench/chaos_bench.py
    out = worker_kills(chaos, n=12, kills=3)
    assert out.figures.faults == 3
    _all_succeeded_once(out, chaos)
    # each killed scan was delivered again and claimed a second time (one may have finished in the milliseconds
    # between the check that it is evaluating and the kill)
    assert out.figures.claimed_again >= 2
    assert out.figures.resent == 0  # Redis still held each killed scan's task: redelivery, not recovery


@pytest.mark.timeout(240)
def test_running_scan_whose_worker_and_task_both_vanished_is_sent_again(chaos: ChaosEnv) -> None:
    out = kill_with_redis_restart(chaos, n=4, rounds=2)
    assert out.figures.faults == 2
    _all_succeeded_once(out, chaos)
    # each victim was recovered and run anew (unless it finished in the milliseconds between check and kill)
    assert out.figures.claimed_again >= 1 and out.figures.resent >= 1



def test_the_broker_is_searched_for_tasks_and_the_recovery_lock_is_taken_once(chaos: ChaosEnv) -> None:
    import uuid

    from store.queue import enqueue_scan, make_celery, scan_ids_in_broker, take_broker_lock

    probe = chaos.settings.model_copy(update={"queue": f"probe-{uuid.uuid4().hex[:6]}"})  # no worker reads it
    scan_id = str(uuid.uuid4())
    assert scan_id not in (scan_ids_in_broker(probe) or set())
    enqueue_scan(make_celery(probe), scan_id, probe.queue)
    assert scan_id in (scan_ids_in_broker(probe) or set())
    lock = f"test-{uuid.uuid4().hex[:6]}"
    assert take_broker_lock(probe, lock, 5) and not take_broker_lock(probe, lock, 5)
    embedded = probe.model_copy(update={"broker_url": None})
    assert scan_ids_in_broker(embedded) is None and take_broker_lock(embedded, lock, 5)
