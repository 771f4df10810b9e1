"""Webhooks end to end: a scan with notify.url through the API and a real Celery worker over Redis, to a real
HTTP receiver on loopback that fails twice; the attempts are readable through GET /scans/{id}/webhooks."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from store import webhooks
from store.db import make_engine, make_session_factory
from store.models import Tenant
from store.settings import Settings
from tests.helpers import backdoored_digits, spec_json, write_npz, write_safetensors
from tests.integration.conftest import new_key
from tests.integration.workers import start_worker, stop_worker, wait_for
from tests.webhook_receiver import Receiver, verify_signature
from worker.webhook_delivery import DELIVERY_HEADER, SIGNATURE_HEADER

pytestmark = pytest.mark.integration


def _parts(tmp: Path) -> dict[str, tuple[str, bytes]]:
    state, clean, _test = backdoored_digits()
    return {"model": ("model.safetensors", write_safetensors(tmp / "m.safetensors", state).read_bytes()),
            "clean_data": ("clean.npz", write_npz(tmp / "clean.npz", clean).read_bytes())}


@pytest.mark.timeout(600)
def test_scan_end_calls_the_webhook_until_it_succeeds(prod_settings: Settings, tmp_path: Path) -> None:
    # own queue: other tests' workers on the shared Redis must not take these tasks
    settings = prod_settings.model_copy(update={
        "queue": f"webhooks-{uuid.uuid4().hex[:8]}", "webhook_allowed_hosts": "127.0.0.1",
        "webhook_allow_private": True, "webhook_retry_base_s": 0.2, "webhook_max_attempts": 4})
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    auth = {"Authorization": f"Bearer {new_key(settings, tenant)}"}
    from api.app import create_app

    with Receiver() as receiver, TestClient(create_app(settings)) as client:
        receiver.script = [(500, {}), (500, {})]
        refused = client.post("/scans", headers=auth, files=_parts(tmp_path),
                              data={"spec": spec_json(notify={"url": "https://hooks.example.com/x"})})
        assert refused.status_code == 422 and refused.json()["field"] == "spec.notify.url"
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            r = client.post("/scans", headers=auth, files=_parts(tmp_path),
                            data={"spec": spec_json(notify={"url": receiver.url + "/hook"})})
            assert r.status_code == 202, r.text
            scan_id = r.json()["id"]

            def attempts() -> list[dict] | None:
                rows = client.get(f"/scans/{scan_id}/webhooks", headers=auth).json()["attempts"]
                return rows if rows and rows[-1]["outcome"] != "retrying" else None

            rows = wait_for(attempts, 300, 0.3, "the webhook's last attempt")
        finally:
            stop_worker(worker)
        log_tail = (tmp_path / "worker.log").read_text()[-3000:]
        assert [(a["attempt"], a["outcome"], a["status_code"]) for a in rows] == [
            (1, "retrying", 500), (2, "retrying", 500), (3, "delivered", 200)], log_tail
        assert len(receiver.requests) == 3
        path, headers, body = receiver.requests[-1]
        assert path == "/hook" and headers[DELIVERY_HEADER] == rows[0]["delivery_id"]
        engine = make_engine(settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            tenant_id = session.query(Tenant.id).filter(Tenant.name == tenant).scalar()
            secret = webhooks.webhook_secret(session, tenant_id)
        engine.dispose()
        assert verify_signature(secret, headers[SIGNATURE_HEADER], body)
        sent = json.loads(body)
        assert sent["scan_id"] == scan_id and sent["status"] == "succeeded" and sent["before"]["acc"] > 0.9
        other = {"Authorization": f"Bearer {new_key(settings)}"}
        assert client.get(f"/scans/{scan_id}/webhooks", headers=other).status_code == 404
