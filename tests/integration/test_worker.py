"""A real Celery worker over real Redis, with PostgreSQL and S3: a scan end to end, and a worker killed
with SIGKILL in the middle of a scan whose task is then delivered again and completes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from core.attacks import make_backdoor_test_set
from core.attacks.registry import create_attack
from core.data.imageset import ImageSet
from core.metrics import accuracy, attack_success_rate, predict, robust_accuracy
from core.models.registry import create_model
from store.db import make_engine, make_session_factory
from store.models import Scan
from store.settings import Settings
from tests.helpers import NORM, backdoored_digits, spec_json, write_npz, write_safetensors
from tests.integration.workers import kill_group, start_worker, stop_worker, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prod_settings(prod_settings: Settings) -> Settings:
    """The production settings on a queue of this module's own: the API tests enqueue scans that no worker of
    theirs takes, and a worker started here must not work through that backlog first."""
    return prod_settings.model_copy(update={"queue": f"worker-tests-{uuid.uuid4().hex[:8]}"})


@pytest.fixture(scope="module")
def prod_client(prod_settings: Settings) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app(prod_settings)) as client:
        yield client


def _status(client: TestClient, auth: dict[str, str], scan_id: str) -> dict:
    return client.get(f"/scans/{scan_id}", headers=auth).json()


def _run_to_success(client: TestClient, settings: Settings, auth: dict[str, str], files: dict, spec: str,
                    timeout_s: float, tmp: Path) -> str:
    """Submit ``spec`` with a real worker running, wait for the scan to end and require success; its id."""
    worker = start_worker(settings, tmp / "worker.log")
    try:
        r = client.post("/scans", headers=auth, files=files, data={"spec": spec})
        assert r.status_code == 202, r.text
        scan_id = r.json()["id"]
        final = wait_for(lambda: (s := _status(client, auth, scan_id))["status"] in ("succeeded", "failed")
                         and s, timeout_s, 0.2, "the scan to finish")
        assert final["status"] == "succeeded", (final, (tmp / "worker.log").read_text()[-3000:])
    finally:
        stop_worker(worker)
    return scan_id


def _digits_parts(tmp: Path) -> dict[str, tuple[str, bytes]]:
    """The backdoored digits model, its clean subset and its test set as multipart file parts."""
    state, clean, test = backdoored_digits()
    return {"model": ("model.safetensors", write_safetensors(tmp / "m.safetensors", state).read_bytes()),
            "clean_data": ("clean.npz", write_npz(tmp / "clean.npz", clean).read_bytes()),
            "test_data": ("test.npz", write_npz(tmp / "test.npz", test).read_bytes())}


@pytest.mark.timeout(900)
def test_backdoored_model_scan_matches_direct_evaluation(prod_client: TestClient, prod_settings: Settings,
                                                         auth: dict[str, str], tmp_path: Path) -> None:
    state, clean, test = backdoored_digits()
    files = _digits_parts(tmp_path)
    scan_id = _run_to_success(prod_client, prod_settings, auth, files,
                              spec_json(attack={"type": "badnets", "target": 0}), 180, tmp_path)
    report = prod_client.get(f"/scans/{scan_id}/report", headers=auth).json()

    model = create_model("resnet20", 10, 1)
    model.load_state_dict(state)
    bd = make_backdoor_test_set(create_attack("badnets", target=0, image_shape=test.image_shape), test, 10)
    pred = predict(model, bd.x, NORM)
    assert report["before"]["acc"] == accuracy(predict(model, test.x, NORM), test.y)
    assert report["before"]["asr"] == attack_success_rate(pred, bd.y_target)
    assert report["before"]["ra"] == robust_accuracy(pred, bd.y_true)
    assert report["before"]["asr"] > 0.9 and report["before"]["acc"] > 0.9  # the backdoor is real
    assert report["data"]["acc_source"] == "test_data" and report["data"]["asr_source"] == "attack:badnets"
    assert set(report["timings"]) >= {"load", "evaluate_before"}
    assert report["model"]["architecture"] == "resnet20" and len(report["model"]["sha256"]) == 64
    metrics = prod_client.get("/metrics").text
    assert 'antidote_stage_duration_seconds_count{stage="evaluate_before"}' in metrics


@pytest.mark.timeout(900)
def test_worker_killed_mid_scan_is_delivered_again(prod_client: TestClient, prod_settings: Settings,
                                                   auth: dict[str, str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = create_model("preactresnet18", 10, 3).state_dict()
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 50))
    test = ImageSet(rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 1000))
    spec = ('{"mode": "scan", "model": {"architecture": "preactresnet18", "num_classes": 10}, '
            '"detect": {"enabled": false}}')
    files = {"model": ("m.safetensors", write_safetensors(tmp_path / "m.safetensors", state).read_bytes()),
             "clean_data": ("c.npz", write_npz(tmp_path / "c.npz", clean).read_bytes()),
             "test_data": ("t.npz", write_npz(tmp_path / "t.npz", test).read_bytes())}
    scan_id = prod_client.post("/scans", headers=auth, files=files, data={"spec": spec}).json()["id"]

    first = start_worker(prod_settings, tmp_path / "worker1.log")
    try:
        wait_for(lambda: _status(prod_client, auth, scan_id)["stage"] == "evaluate_before", 120, 0.02,
                 "the scan to be evaluating")
    finally:
        kill_group(first)  # SIGKILL to the whole worker: no chance to acknowledge or clean up
    assert _status(prod_client, auth, scan_id)["status"] == "running"

    second = start_worker(prod_settings, tmp_path / "worker2.log")
    try:
        final = wait_for(lambda: (s := _status(prod_client, auth, scan_id))["status"] in ("succeeded", "failed")
                         and s, 240, 0.5, "the redelivered scan to finish")
    finally:
        stop_worker(second)
    assert final["status"] == "succeeded", (final, (tmp_path / "worker2.log").read_text()[-3000:])
    engine = make_engine(prod_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None and scan.attempts == 2
    engine.dispose()


@pytest.mark.timeout(900)
def test_repair_scan_returns_weights_shaped_like_the_upload(prod_client: TestClient, prod_settings: Settings,
                                                            auth: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state, clean, test = backdoored_digits()
    files = _digits_parts(tmp_path)
    params = {"finetune_epochs": 3, "batch_size": 64, "augment": False, "lr_unlearn": 0.01,
              "unlearn_max_epochs": 20}
    spec = spec_json("repair", attack={"type": "badnets", "target": 0}, repair={"method": "tsbd", "params": params})
    scan_id = _run_to_success(prod_client, prod_settings, auth, files, spec, 600, tmp_path)
    report = prod_client.get(f"/scans/{scan_id}/report", headers=auth).json()
    assert report["repair"]["method"] == "tsbd"
    assert report["repair"]["params"]["finetune_epochs"] == 3  # every value used, given or default
    assert "neuron_ratio" in report["repair"]["chosen"]  # the automatically chosen n is recorded
    for key in ("acc", "asr", "ra"):
        assert isinstance(report["after"][key], float)
    assert "der" in report and {"load", "evaluate_before", "repair", "evaluate_after"} <= set(report["timings"])

    r = prod_client.get(f"/scans/{scan_id}/artifacts/repaired_model", headers=auth)
    assert r.status_code == 200
    (tmp_path / "repaired.safetensors").write_bytes(r.content)
    repaired = load_file(str(tmp_path / "repaired.safetensors"))
    assert {k: tuple(v.shape) for k, v in repaired.items()} == {k: tuple(v.shape) for k, v in state.items()}
    model = create_model("resnet20", 10, 1)
    model.load_state_dict(repaired)
    assert report["after"]["acc"] == accuracy(predict(model, test.x, NORM), test.y)
    assert prod_client.get(f"/scans/{scan_id}/artifacts/nope", headers=auth).status_code == 404
    # deleting the finished scan removes its files too
    assert prod_client.delete(f"/scans/{scan_id}", headers=auth).status_code == 204
    assert prod_client.get(f"/scans/{scan_id}/artifacts/repaired_model", headers=auth).status_code == 404


def _poisoned_digits_training(n: int = 400) -> tuple[ImageSet, np.ndarray]:
    """The first ``n`` samples of the backdoored digits model's own training data (10% BadNets to class 0, as
    cli/demo.py poisons it) and the mask of the poisoned ones."""
    from cli.demo import load_digits
    from core.attacks import poison_training_set

    data = load_digits()
    train = data.subset(np.random.default_rng(0).permutation(len(data))[:1200])
    attack = create_attack("badnets", target=0, image_shape=train.image_shape)
    poisoned = poison_training_set(attack, train, 0.1, 10, seed=0)
    mask = np.zeros(len(train), bool)
    mask[poisoned.poisoned_index] = True
    return poisoned.data.subset(np.arange(n)), mask[:n]


@pytest.mark.timeout(900)
def test_repair_data_scan_reports_the_flags_and_serves_a_consistent_csv(
        prod_client: TestClient, prod_settings: Settings, auth: dict[str, str], tmp_path: Path) -> None:
    import csv
    import io

    from safetensors.torch import load_file

    state, clean, test = backdoored_digits()
    training, corrupt = _poisoned_digits_training()
    np.savez(tmp_path / "train.npz", x=training.x, y=training.y, is_corrupt=corrupt.astype(np.uint8))
    files = {**_digits_parts(tmp_path), "training_data": ("train.npz", (tmp_path / "train.npz").read_bytes())}
    params = {"calib_epochs": 2, "checkpoints": 1, "epochs": 1, "augment": False, "calib_augment": False,
              "scratch_epochs": 2}
    spec = spec_json("repair_data", attack={"type": "badnets", "target": 0}, repair_data={"params": params})
    scan_id = _run_to_success(prod_client, prod_settings, auth, files, spec, 300, tmp_path)
    report = prod_client.get(f"/scans/{scan_id}/report", headers=auth).json()

    section = report["repair_data"]
    assert section["method"] == "retain" and section["params"]["calib_epochs"] == 2  # every value used
    assert section["training_images"] == report["data"]["training_images"] == 400
    assert report["data"]["training_is_corrupt"] == int(corrupt.sum()) > 0
    assert {"load", "evaluate_before", "repair_data", "evaluate_after"} <= set(report["timings"])
    for key in ("acc", "asr"):
        assert isinstance(report["before"][key], float) and isinstance(report["after"][key], float)

    r = prod_client.get(f"/scans/{scan_id}/artifacts/sample_scores", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == ["index", "label", "score", "flagged", "new_label", "input_flagged", "is_corrupt"]
    assert [int(row["index"]) for row in rows] == list(range(400))
    assert [int(row["label"]) for row in rows] == training.y.tolist()
    assert [bool(int(row["is_corrupt"])) for row in rows] == corrupt.tolist()
    flagged = np.array([int(row["flagged"]) for row in rows], bool)
    new = np.array([int(row["new_label"]) for row in rows])
    scores = np.array([float(row["score"]) for row in rows])
    assert np.isfinite(scores).all()
    assert section["n_flagged"] == int(flagged.sum())
    assert section["n_relabelled"] == int(((new >= 0) & (new != training.y)).sum())
    assert section["n_dropped"] == int((new < 0).sum())
    quality = section["identification"]
    hits = int((flagged & corrupt).sum())
    assert quality["n_flagged_corrupt"] == hits and quality["n_corrupt"] == int(corrupt.sum())
    assert quality["recall"] == hits / corrupt.sum()
    assert quality["precision"] == (hits / flagged.sum() if flagged.any() else None)
    assert 0.0 <= quality["auroc"] <= 1.0

    r = prod_client.get(f"/scans/{scan_id}/artifacts/repaired_model", headers=auth)
    (tmp_path / "repaired.safetensors").write_bytes(r.content)
    model = create_model("resnet20", 10, 1)
    model.load_state_dict(load_file(str(tmp_path / "repaired.safetensors")))
    assert report["after"]["acc"] == accuracy(predict(model, test.x, NORM), test.y)
