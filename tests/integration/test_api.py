"""The REST API on PostgreSQL + S3 + Redis: the contract's answers, bad input, tenants, and nothing half-stored."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.data.imageset import ImageSet
from core.models.registry import create_model
from store.db import make_engine, make_session_factory
from store.models import Scan
from store.settings import Settings
from tests.helpers import SPEC_MODEL, spec_json, write_npz, write_safetensors
from tests.integration.conftest import new_key

pytestmark = pytest.mark.integration


class _Payload:
    """Unpickling this runs os.system: the canary file appears if anything ever unpickles it unsafely."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.canary}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    state = create_model("resnet20", 10, 1).state_dict()
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 40))
    return {"model": write_safetensors(d / "model.safetensors", state), "clean": write_npz(d / "clean.npz", clean),
            "state_pt": d / "state.pt"}


def post(client: TestClient, auth: dict[str, str], spec: str | None, **parts: tuple[str, bytes]):  # type: ignore[no-untyped-def]
    data = {"spec": spec} if spec is not None else {}
    return client.post("/scans", headers=auth, data=data, files={k: v for k, v in parts.items()})


def ok_parts(files: dict[str, Path]) -> dict[str, tuple[str, bytes]]:
    return {"model": ("model.safetensors", files["model"].read_bytes()),
            "clean_data": ("clean.npz", files["clean"].read_bytes())}


def scans_of(settings: Settings, auth: dict[str, str]) -> int:
    from store import repository

    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        tenant = repository.tenant_for_key(session, auth["Authorization"].split()[1])
        assert tenant is not None
        n = session.scalar(select(func.count()).select_from(Scan).where(Scan.tenant_id == tenant.id))
    engine.dispose()
    return int(n or 0)


def test_create_read_list_and_tenant_isolation(prod_client: TestClient, prod_settings: Settings,
                                               auth: dict[str, str], files: dict[str, Path]) -> None:
    r = post(prod_client, auth, spec_json(attack={"type": "badnets", "target": 0}), **ok_parts(files))
    assert r.status_code == 202, r.text
    scan_id = r.json()["id"]
    assert r.json()["status"] == "queued" and r.headers["location"] == f"/scans/{scan_id}"

    got = prod_client.get(f"/scans/{scan_id}", headers=auth).json()
    assert got["status"] == "queued" and got["progress"] == 0 and got["error"] is None
    assert [s["id"] for s in prod_client.get("/scans", headers=auth).json()["items"]] == [scan_id]
    assert prod_client.get(f"/scans/{scan_id}/report", headers=auth).status_code == 409

    other = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    for path in (f"/scans/{scan_id}", f"/scans/{scan_id}/report", f"/scans/{scan_id}/artifacts/repaired_model"):
        assert prod_client.get(path, headers=other).status_code == 404
    assert prod_client.delete(f"/scans/{scan_id}", headers=other).status_code == 404
    assert prod_client.get("/scans", headers=other).json()["items"] == []

    # cancel while queued, then delete the canceled scan and its files
    r = prod_client.delete(f"/scans/{scan_id}", headers=auth)
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    assert prod_client.delete(f"/scans/{scan_id}", headers=auth).status_code == 204
    assert prod_client.get(f"/scans/{scan_id}", headers=auth).status_code == 404


def test_pagination_newest_first(prod_client: TestClient, auth: dict[str, str], files: dict[str, Path]) -> None:
    ids = [post(prod_client, auth, spec_json(), **ok_parts(files)).json()["id"] for _ in range(3)]
    first = prod_client.get("/scans?limit=2", headers=auth).json()
    second = prod_client.get(f"/scans?limit=2&cursor={first['next_cursor']}", headers=auth).json()
    assert [s["id"] for s in first["items"] + second["items"]] == ids[::-1]
    assert second["next_cursor"] is None
    assert prod_client.get("/scans?status=succeeded", headers=auth).json()["items"] == []
    assert prod_client.get("/scans?cursor=garbage", headers=auth).status_code == 422
    assert prod_client.get("/scans?status=bogus", headers=auth).status_code == 422


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer adk_not-a-key", "Basic dXNlcjpwYXNz"])
def test_missing_or_wrong_key_is_401(prod_client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    r = prod_client.get("/scans", headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert prod_client.post("/scans", headers=headers).status_code == 401


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _png(h: int, w: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.zeros((h, w), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _bad_cases(files: dict[str, Path], tmp: Path,
               limit: int) -> list[tuple[str, dict, str | None, int, str, str]]:
    """(name, parts overriding the good ones, spec or None for the good one, status, field, text in detail)."""
    state = create_model("resnet20", 10, 1).state_dict()
    good_st = files["model"].read_bytes()
    hdr_len = struct.unpack("<Q", good_st[:8])[0]
    canary = tmp / "canary"
    pickle_pt = tmp / "evil.pt"
    torch.save({"state_dict": state, "extra": _Payload(canary)}, pickle_pt)
    wrong_arch = tmp / "wrong.safetensors"
    write_safetensors(wrong_arch, create_model("preactresnet18", 10, 1).state_dict())
    rng = np.random.default_rng(1)
    x8 = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
    x12 = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
    return [
        ("pickle that runs code", {"model": ("evil.pt", pickle_pt.read_bytes())}, None, 422, "model", ""),
        ("truncated safetensors", {"model": ("m.safetensors", good_st[: 8 + hdr_len + 100])}, None, 422, "model", ""),
        ("hostile safetensors header", {"model": ("m.safetensors", struct.pack("<Q", 2**62) + b"{}")}, None, 422,
         "model", ""),
        ("wrong architecture", {"model": ("w.safetensors", wrong_arch.read_bytes())}, None, 422, "model", "missing"),
        ("unknown model format", {"model": ("m.onnx", b"onnx")}, None, 415, "model", ""),
        ("npz with objects", {"clean_data": ("c.npz", _npz(x=np.array([object()] * 3, dtype=object),
                                                            y=np.zeros(3, np.int64)))}, None, 422, "clean_data", ""),
        ("labels out of range", {"clean_data": ("c.npz", _npz(x=x8, y=np.full(10, 12)))}, None, 422, "clean_data",
         "outside [0, 10)"),
        ("mismatched image sizes", {"test_data": ("t.npz", _npz(x=np.zeros((4, 16, 16), np.uint8),
                                                                 y=np.zeros(4, np.int64)))}, None, 422, "test_data",
         "16x16"),
        ("zip with ../ names", {"clean_data": ("c.zip", _zip({"../0/a.png": _png(8, 8), "1/b.png": _png(8, 8)}))},
         None, 422, "clean_data", ""),
        ("zip bomb", {"clean_data": ("c.zip", _zip({"0/a.png": b"\0" * (64 * 1024 * 1024)}))}, None, 422,
         "clean_data", ""),
        ("unknown data format", {"clean_data": ("c.csv", b"1,2,3")}, None, 415, "clean_data", ""),
        ("invalid spec field", {}, json.dumps({"mode": "scan", "model": {"architecture": "resnet20",
                                                                           "num_classes": 1, "in_channels": 1}}),
         422, "spec.model.num_classes", "spec.model.num_classes"),
        ("unknown architecture", {}, json.dumps({"mode": "scan", "model": {"architecture": "lenet9",
                                                                             "num_classes": 10}}), 422,
         "spec.model.architecture", "unknown architecture"),
        ("spec not JSON", {}, "{mode: scan", 422, "spec", ""),
        ("mode repair_data without training_data", {}, spec_json("repair_data"), 422, "training_data",
         "is required by mode repair_data"),
        ("attack target out of range", {}, spec_json(attack={"type": "badnets", "target": 10}), 422, "spec", ""),
        ("epochs out of range", {}, spec_json("repair", repair={"method": "finetune", "params": {"epochs": 10**9}}),
         422, "spec.repair.params.epochs", "less than or equal to 300"),
        ("fractional patch size", {}, spec_json(attack={"type": "badnets", "params": {"patch_size": 2.5}}), 422,
         "spec.attack.params.patch_size", "valid integer"),
        ("unknown attack parameter", {}, spec_json(attack={"type": "sig", "params": {"size": 3}}), 422,
         "spec.attack.params.size", "valid: all_to_all, delta, frequency"),
        ("NaN mean", {}, '{"mode": "scan", "model": {"architecture": "resnet20", "num_classes": 10, '
                         '"in_channels": 1, "mean": [NaN]}}', 422, "spec.model.mean.0", "finite"),
        ("training_data in scan mode", {"training_data": ("t.npz", files["clean"].read_bytes())}, None, 422,
         "training_data", "only used by mode repair_data"),
        *_repair_data_cases(limit),
        ("too few clean images for the detector", {"clean_data": ("c.npz", _npz(x=x12[:11], y=np.arange(11) % 10))},
         json.dumps({"mode": "scan", "model": SPEC_MODEL}), 422, "clean_data",
         "needs at least 10 clean images to learn from, got 9 (11 uploaded less the 20% held out"),
        ("one clean image for a repair", {"clean_data": ("c.npz", _npz(x=x12[:2], y=np.arange(2)))},
         spec_json("repair", repair={"method": "finetune"}), 422, "clean_data",
         "needs at least 2 clean images to learn from, got 1 (2 uploaded less the 20% held out"),
        ("too few clean images for identification", {
            "clean_data": ("c.npz", _npz(x=x8[:5], y=np.arange(5))),
            "training_data": ("t.npz", _npz(x=x8, y=np.arange(10)))},
         spec_json("repair_data", repair_data={"method": "retain", "params": {"folds": 3}}), 422, "clean_data",
         "needs at least 6 clean images (2 per identification fold), got 4"),
        ("unknown part", {"weights": ("w.bin", b"x")}, None, 422, "weights", ""),
        # the holes found after issue 8: each was queued before and failed late, ran twice or ran out of proportion
        ("images without pixels", {"clean_data": ("c.npz", _npz(x=np.zeros((12, 0, 0), np.uint8),
                                                                 y=np.arange(12) % 10))}, None, 422, "clean_data",
         "at least one pixel"),
        ("a detector named twice", {}, spec_json(detect={"params": {"detectors": ["neural_cleanse"] * 2}}), 422,
         "spec.detect.params.detectors", "at most once"),
        ("a seed of true", {}, spec_json(seed=True), 422, "spec.seed", "valid integer"),
        ("layer_exclude leaving TSBD no layer", {}, spec_json("repair", repair={
            "method": "tsbd", "params": {"layer_exclude": ["downsample", "conv"]}}), 422,
         "spec.repair.params.layer_exclude", "no Conv2d layer"),
        # (a detector step over 4096 images is no longer refused: it runs in chunks of classes, issue 9; the
        # refusals left, one class's batch or the trigger state over the byte bound: tests/unit/test_api_hostile_specs)
        # PostgreSQL's jsonb refuses \u0000: these failed their INSERT with a 500
        ("a NUL in a spec string", {}, spec_json("repair", repair={
            "method": "tsbd", "params": {"layer_exclude": ["conv\u0000"]}}), 422,
         "spec.repair.params.layer_exclude.0", "NUL"),
    ]


def _repair_data_cases(limit: int) -> list[tuple[str, dict, str | None, int, str, str]]:
    """Mode repair_data's own refusals: training_data that does not fit clean_data or the model, a bad
    is_corrupt array, more than ``limit`` (ANTIDOTE_MAX_TRAINING_IMAGES) training images (refused from the
    array header, before it is read), an unknown method or parameter."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 10, 40)
    spec = spec_json("repair_data")

    def training(**arrays: object) -> dict[str, tuple[str, bytes]]:
        return {"training_data": ("train.npz", _npz(**{"x": x, "y": y, **arrays}))}

    return [
        ("training_data of another image size", {"training_data": ("t.npz", _npz(
            x=np.zeros((4, 16, 16), np.uint8), y=np.zeros(4, np.int64)))}, spec, 422, "training_data", "16x16"),
        ("training_data of another channel count", {"training_data": ("t.npz", _npz(
            x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.int64)))}, spec, 422, "training_data",
         "3 channel(s) but spec.model.in_channels is 1"),
        ("training labels out of range", training(y=np.full(40, 10)), spec, 422, "training_data",
         "outside [0, 10)"),
        ("is_corrupt of the wrong length", training(is_corrupt=np.zeros(39, bool)), spec, 422, "training_data",
         "'is_corrupt' must have shape (40,)"),
        ("is_corrupt of the wrong dtype", training(is_corrupt=np.zeros(40, np.float32)), spec, 422,
         "training_data", "'is_corrupt' must be bool or uint8"),
        ("is_corrupt with values other than 0/1", training(is_corrupt=np.full(40, 2, np.uint8)), spec, 422,
         "training_data", "only 0 and 1"),
        ("training_data over its limit", {"training_data": ("t.npz", _npz(
            x=np.zeros((limit + 1, 8, 8), np.uint8), y=np.zeros(limit + 1, np.uint8)))}, spec, 422,
         "training_data", f"{limit + 1} images, over the limit of {limit}"),
        ("training class folders unlike clean_data's", {
            "clean_data": ("c.zip", _zip({"cat/a.png": _png(8, 8), "dog/b.png": _png(8, 8)})),
            "training_data": ("t.zip", _zip({"cat/a.png": _png(8, 8), "emu/b.png": _png(8, 8)}))}, spec, 422,
         "training_data", "are not clean_data's"),
        ("unknown data-repair method", training(), spec_json("repair_data", repair_data={"method": "magic"}), 422,
         "spec.repair_data.method", "unknown"),
        ("data-repair parameter out of range", training(), spec_json(
            "repair_data", repair_data={"method": "retain", "params": {"epochs": 10**9}}), 422,
         "spec.repair_data.params.epochs", "less than or equal to 300"),
        ("unknown data-repair parameter", training(), spec_json(
            "repair_data", repair_data={"params": {"epoch": 1}}), 422, "spec.repair_data.params.epoch",
         "unknown parameter"),
    ]


def test_bad_input_is_refused_with_a_named_field_and_nothing_stored(
        prod_client: TestClient, prod_settings: Settings, files: dict[str, Path], tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    failures = []
    for name, parts, spec, status, field, text in _bad_cases(files, tmp_path, prod_settings.max_training_images):
        r = post(prod_client, auth, spec if spec is not None else spec_json(), **{**ok_parts(files), **parts})
        body = r.json()
        if r.status_code != status or not body.get("field", "").startswith(field) or text not in body["detail"]:
            failures.append(f"{name}: {r.status_code} {body}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "canary").exists(), "the pickle payload ran"
    assert scans_of(prod_settings, auth) == 0


def test_missing_parts(prod_client: TestClient, auth: dict[str, str], files: dict[str, Path]) -> None:
    r = post(prod_client, auth, None, **ok_parts(files))
    assert r.status_code == 422 and r.json()["field"] == "spec"
    r = post(prod_client, auth, spec_json(), model=ok_parts(files)["model"])
    assert r.status_code == 422 and r.json()["field"] == "clean_data"
    r = prod_client.post("/scans", headers=auth, content=b"{}", params={})
    assert r.status_code == 415


def test_upload_over_the_limit_is_413(prod_settings: Settings, files: dict[str, Path]) -> None:
    from api.app import create_app

    small = prod_settings.model_copy(update={"max_model_bytes": 10_000, "max_upload_bytes": 10**9})
    auth = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    with TestClient(create_app(small)) as client:
        r = post(client, auth, spec_json(), **ok_parts(files))
        assert r.status_code == 413 and r.json()["field"] == "model"
    tiny = prod_settings.model_copy(update={"max_upload_bytes": 5_000})
    with TestClient(create_app(tiny)) as client:
        assert post(client, auth, spec_json(), **ok_parts(files)).status_code == 413
    assert scans_of(prod_settings, auth) == 0


def test_health_ready_metrics_and_docs(prod_client: TestClient) -> None:
    assert prod_client.get("/healthz").json() == {"status": "ok"}
    ready = prod_client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok", "broker": "ok"}
    text = prod_client.get("/metrics").text
    assert 'antidote_scans{status="queued"}' in text
    assert "antidote_queue_depth" in text and "antidote_upload_bytes_total" in text
    assert prod_client.get("/openapi.json").json()["paths"]["/scans"]["post"]
    assert prod_client.get("/docs").status_code == 200


def test_readyz_names_what_is_down(prod_settings: Settings) -> None:
    from api.app import create_app

    down = prod_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == "ok" and r.json()["checks"]["broker"].startswith("error")


def test_a_tenant_over_its_cap_of_active_scans_is_429(prod_settings: Settings, files: dict[str, Path]) -> None:
    from api.app import create_app

    capped = prod_settings.model_copy(update={"max_active_scans_per_tenant": 2, "retry_after_s": 7})
    auth = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    other = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    with TestClient(create_app(capped)) as client:
        for _ in range(2):
            assert post(client, auth, spec_json(), **ok_parts(files)).status_code == 202
        r = post(client, auth, spec_json(), **ok_parts(files))
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert "2 scans queued or running" in r.json()["detail"]
        assert "ANTIDOTE_MAX_ACTIVE_SCANS_PER_TENANT=2" in r.json()["detail"]
        assert post(client, other, spec_json(), **ok_parts(files)).status_code == 202  # tenants apart
        scan_id = client.get("/scans", headers=auth).json()["items"][0]["id"]
        assert client.delete(f"/scans/{scan_id}", headers=auth).status_code == 202  # asks to cancel
        from store import repository
        from store.models import ScanStatus

        engine = make_engine(prod_settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            repository.end_scan(session, scan_id, ScanStatus.canceled)
        engine.dispose()
        assert post(client, auth, spec_json(), **ok_parts(files)).status_code == 202  # a slot is free again
    assert scans_of(prod_settings, auth) == 3


def test_uploads_over_the_process_budget_are_503_and_store_nothing(prod_settings: Settings,
                                                                   files: dict[str, Path]) -> None:
    from api.app import create_app

    auth = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    tight = prod_settings.model_copy(update={"max_concurrent_uploads": 1, "max_spool_bytes": 50_000,
                                             "retry_after_s": 3})
    with TestClient(create_app(tight)) as client:
        budget = client.app.state.upload_budget  # type: ignore[attr-defined]
        held = budget.admit(10)  # another upload in flight
        r = post(client, auth, spec_json(), **ok_parts(files))
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert "ANTIDOTE_MAX_CONCURRENT_UPLOADS=1" in r.json()["detail"]
        held.release()
        r = post(client, auth, spec_json(), **ok_parts(files))  # the model alone is over 50 kB
        assert r.status_code == 503 and "ANTIDOTE_MAX_SPOOL_BYTES=50000" in r.json()["detail"]

        built = client.build_request("POST", "/scans", data={"spec": spec_json()}, files=ok_parts(files))
        body = built.read()

        def chunked():  # no Content-Length: the budget is taken as the bytes arrive
            for i in range(0, len(body), 8192):
                yield body[i:i + 8192]

        r = client.post("/scans", headers={**auth, "content-type": built.headers["content-type"]},
                        content=chunked())
        assert r.status_code == 503 and "ANTIDOTE_MAX_SPOOL_BYTES=50000" in r.json()["detail"]
        assert (budget.uploads, budget.bytes) == (0, 0)  # every refusal gave its share back
        ok = tight.model_copy(update={"max_spool_bytes": 10**9})
    with TestClient(create_app(ok)) as client:
        assert post(client, auth, spec_json(), **ok_parts(files)).status_code == 202
        budget = client.app.state.upload_budget  # type: ignore[attr-defined]
        assert (budget.uploads, budget.bytes) == (0, 0)
    assert scans_of(prod_settings, auth) == 1


def test_an_unexpected_error_is_a_json_500_with_a_request_id_in_the_log(
        prod_settings: Settings, files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from api.app import create_app

    auth = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    app = create_app(prod_settings)

    def broken_put(key: str, path: Path) -> None:
        raise RuntimeError("disk on fire")

    app.state.store.put_file = broken_put
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level("ERROR", "antidote.api"):
        r = post(client, auth, spec_json(), **ok_parts(files))
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    request_id = r.json()["request_id"]
    assert r.headers["x-request-id"] == request_id and "request id" in r.json()["detail"]
    logged = [rec for rec in caplog.records if getattr(rec, "request_id", None) == request_id]
    assert logged and "disk on fire" in (logged[0].exc_text or "") + str(logged[0].exc_info)
    assert scans_of(prod_settings, auth) == 0


def test_fastapi_own_errors_have_the_error_shape(prod_client: TestClient, auth: dict[str, str]) -> None:
    r = prod_client.get("/scans", headers=auth, params={"limit": "many"})
    assert r.status_code == 422 and r.json()["field"] == "limit" and isinstance(r.json()["detail"], str)
    r = prod_client.get("/scans", headers=auth, params={"status": "lost"})
    assert r.status_code == 422 and r.json()["field"] == "status"
    assert prod_client.get("/nowhere").json() == {"detail": "Not Found"}
    assert prod_client.patch("/scans").json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize("scan_id", ["a%00b", "%00" * 36, "A" * 36, "x" * 10_000])
def test_an_id_of_no_scans_shape_is_404_on_every_route(prod_client: TestClient, auth: dict[str, str],
                                                       scan_id: str) -> None:
    """A NUL in the path reached PostgreSQL, which refuses it in a text parameter: every route answered 500."""
    for method, path in [("GET", ""), ("GET", "/report"), ("GET", "/artifacts/repaired_model"), ("GET", "/webhooks"),
                         ("GET", "/report.html"), ("GET", "/figures/scores.png"), ("GET", "/images/x"),
                         ("POST", "/links"), ("DELETE", "")]:
        r = prod_client.request(method, f"/scans/{scan_id}{path}", headers=auth)
        assert r.status_code == 404 and r.json()["detail"].startswith("no scan"), (method, path, r.text)


def test_a_cursor_naming_no_scans_id_is_422(prod_client: TestClient, auth: dict[str, str]) -> None:
    import base64

    for raw in (b"2020-01-01T00:00:00+00:00|a\x00b", b"2020-01-01T00:00:00+00:00|not-an-id"):
        cursor = base64.urlsafe_b64encode(raw).decode()
        for path in ("/scans", "/scans.html"):
            r = prod_client.get(path, headers=auth, params={"cursor": cursor})
            assert r.status_code == 422 and r.json()["field"] == "cursor", (path, r.text)


def _raw_form(parts: list[tuple[bytes, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart body written byte for byte (an HTTP client would escape what these tests send)."""
    boundary = b"antidote-test-boundary"
    body = b"".join(b"--" + boundary + b"\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n" + data
                    + b"\r\n" for disposition, data in parts) + b"--" + boundary + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


@pytest.mark.parametrize("filename", [b"m\x00.safetensors", b"m\x1b[31m.safetensors", b"m\x7f.safetensors"])
def test_a_filename_with_a_control_character_is_422_naming_the_part(
        prod_client: TestClient, prod_settings: Settings, files: dict[str, Path], filename: bytes) -> None:
    """The filename is stored with the scan: a NUL failed the INSERT into PostgreSQL's jsonb with a 500."""
    auth = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    body, headers = _raw_form([(b'name="spec"', spec_json().encode()),
                               (b'name="model"; filename="' + filename + b'"', files["model"].read_bytes()),
                               (b'name="clean_data"; filename="c.npz"', files["clean"].read_bytes())])
    r = prod_client.post("/scans", headers={**auth, **headers}, content=body)
    assert r.status_code == 422 and r.json()["field"] == "model", r.text
    assert "control character" in r.json()["detail"]
    assert scans_of(prod_settings, auth) == 0


@pytest.mark.parametrize("length,field", [(300, "model"), (10_000, None)])
def test_a_filename_too_long_is_422_and_says_so(prod_client: TestClient, prod_settings: Settings,
                                                files: dict[str, Path], length: int, field: str | None) -> None:
    """A 300-character filename was stored with the scan and shown to clients; a 10 KB one was refused by the
    parser's header bound with its own words. Both answers say what was too long, the first naming the part."""
    auth = {"Authorization": f"Bearer {new_key(prod_settings)}"}
    body, headers = _raw_form([(b'name="spec"', spec_json().encode()),
                               (b'name="model"; filename="' + b"m" * length + b'"', files["model"].read_bytes()),
                               (b'name="clean_data"; filename="c.npz"', files["clean"].read_bytes())])
    r = prod_client.post("/scans", headers={**auth, **headers}, content=body)
    assert r.status_code == 422 and r.json().get("field") == field, r.text
    assert ("filename of 300 characters" if field else "header line is over 4224 bytes") in r.json()["detail"]
    assert scans_of(prod_settings, auth) == 0


@pytest.mark.parametrize("boundary", ["a" * 257, ""])
def test_a_multipart_boundary_the_parser_cannot_take_is_415(prod_client: TestClient, auth: dict[str, str],
                                                             boundary: str) -> None:
    """python-multipart refuses a boundary over 256 characters when the parser is made, before the body is read:
    that was a 500."""
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"\r\n\r\n{{}}\r\n--{boundary}--\r\n"
    r = prod_client.post("/scans", headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                         content=body.encode())
    assert r.status_code == 415 and r.json()["field"] == "content-type" and "boundary" in r.json()["detail"], r.text
