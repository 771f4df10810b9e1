"""Running scans nobody will end (Celery's hard limit acknowledges the task it kills) are failed by the API's
sweep, on PostgreSQL."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from store import repository
from store.db import make_engine, make_session_factory
from store.models import Scan, utcnow
from store.settings import Settings
from tests.integration.conftest import new_key


def _scan(settings: Settings, key: str, status: str, silent_s: float, ran_s: float) -> str:
    """A scan in ``status`` whose last progress was ``silent_s`` ago and that started ``ran_s`` ago."""
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        tenant = repository.tenant_for_key(session, key)
        assert tenant is not None
        scan_id = str(uuid.uuid4())
        repository.add_scan(session, scan_id, tenant.id, "scan", {}, {})
        now = utcnow()
        session.execute(update(Scan).where(Scan.id == scan_id).values(
            status=status, updated_at=now - timedelta(seconds=silent_s), started_at=now - timedelta(seconds=ran_s)))
        session.commit()
    engine.dispose()
    return scan_id


def _status(settings: Settings, scan_id: str) -> tuple[str, str | None, str | None]:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None
        out = (scan.status, scan.error_code, scan.error_message)
    engine.dispose()
    return out


def test_only_silent_running_scans_are_failed_with_the_right_code(prod_settings: Settings) -> None:
    key = new_key(prod_settings)
    over_limit = _scan(prod_settings, key, "running", silent_s=4000, ran_s=4000)
    lost = _scan(prod_settings, key, "running", silent_s=50, ran_s=100)
    fresh = _scan(prod_settings, key, "running", silent_s=5, ran_s=4000)
    queued = _scan(prod_settings, key, "queued", silent_s=9000, ran_s=9000)
    engine = make_engine(prod_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        failed = repository.fail_stale_running(session, stale_after_s=30, time_limit_s=3600)
        assert repository.fail_stale_running(session, stale_after_s=30, time_limit_s=3600) == []  # idempotent
    engine.dispose()
    assert set(failed) >= {over_limit, lost} and not {fresh, queued} & set(failed)
    status, code, message = _status(prod_settings, over_limit)
    assert (status, code) == ("failed", "time_limit") and "ANTIDOTE_SCAN_TIME_LIMIT_S" in (message or "")
    assert _status(prod_settings, lost)[:2] == ("failed", "worker_lost")
    assert _status(prod_settings, fresh)[0] == "running" and _status(prod_settings, queued)[0] == "queued"


def test_the_api_sweeps_in_the_background(prod_settings: Settings) -> None:
    from api.app import create_app

    settings = prod_settings.model_copy(update={"stale_sweep_interval_s": 0.2, "scan_time_limit_s": 1})
    key = new_key(settings)
    stale = _scan(settings, key, "running", silent_s=3600, ran_s=3600)  # > 1 + 180 s
    alive = _scan(settings, key, "running", silent_s=10, ran_s=3600)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 10
        while client.get(f"/scans/{stale}", headers={"Authorization": f"Bearer {key}"}).json()["status"] == "running":
            assert time.monotonic() < deadline, "the sweep did not fail the stale scan"
            time.sleep(0.1)
        got = client.get(f"/scans/{stale}", headers={"Authorization": f"Bearer {key}"}).json()
    assert got["status"] == "failed" and got["error"]["code"] == "time_limit"
    assert _status(settings, alive)[0] == "running"
