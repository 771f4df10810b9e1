"""Hostile specs and uploads through the real app on the embedded default: each answered 422 at the field
that is wrong, before anything is stored (the holes found after issue 8, where a worker failed late or ran a
setting out of proportion)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.data.imageset import ImageSet
from core.models.registry import create_model
from store import repository
from store.db import make_engine, make_session_factory, upgrade_database
from store.settings import Settings
from tests.helpers import write_npz, write_safetensors

MODEL = {"architecture": "resnet20", "num_classes": 10, "in_channels": 1}


@pytest.fixture
def env(embedded_settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], Path]]:
    from api.app import create_app

    embedded_settings.data_dir.mkdir(parents=True)
    # 512 KiB: the detector state bound of the test below, far above what the small files here expand to
    embedded_settings.max_zip_expanded_bytes = 512 * 2**10
    upgrade_database(embedded_settings.resolved_database_url)
    with make_session_factory(make_engine(embedded_settings.resolved_database_url))() as s:
        key = repository.create_api_key(s, "hostile")
    write_safetensors(tmp_path / "m.safetensors", create_model("resnet20", 10, 1).state_dict())
    rng = np.random.default_rng(0)
    write_npz(tmp_path / "c.npz", ImageSet(rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 10))
    write_npz(tmp_path / "empty_images.npz", ImageSet(np.zeros((40, 0, 0, 1), np.uint8), np.arange(40) % 10))
    labels = np.arange(40) % 10
    labels[np.random.default_rng(0).permutation(40)[:8]] = 0  # clean_data's 20% evaluation hold-out of seed 0
    write_npz(tmp_path / "all_target.npz", ImageSet(rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), labels))
    with TestClient(create_app(embedded_settings)) as client:
        yield client, {"Authorization": f"Bearer {key}"}, tmp_path


def _post(env: tuple[TestClient, dict[str, str], Path], spec: dict[str, Any], clean: str = "c.npz") -> Any:
    client, auth, files = env
    with open(files / "m.safetensors", "rb") as m, open(files / clean, "rb") as c:
        return client.post("/scans", headers=auth, data={"spec": json.dumps(spec)},
                           files={"model": ("m.safetensors", m), "clean_data": (clean, c)})


def _spec(**extra: Any) -> dict[str, Any]:
    return {"mode": "scan", "model": MODEL, "detect": {"enabled": False}, **extra}


def _repair(**params: Any) -> dict[str, Any]:
    return _spec(mode="repair", repair={"method": "tsbd", "params": params})


@pytest.mark.parametrize(("spec", "clean", "field", "says"), [
    (_spec(detect={"params": {"detectors": ["neural_cleanse"] * 16}}), "c.npz", "spec.detect.params.detectors",
     "at most once"),
    (_repair(auto_candidates=[0.5, 0.5]), "c.npz", "spec.repair.params", "auto_candidates must not repeat"),
    (_repair(auto_candidates=["0.5"]), "c.npz", "spec.repair.params.auto_candidates.0", "valid number"),
    (_repair(layer_exclude=[""]), "c.npz", "spec.repair.params.layer_exclude.0", "at least 1 character"),
    (_spec(model={**MODEL, "in_channels": True}), "c.npz", "spec.model.in_channels", "JSON integer 1 or 3"),
    (_spec(seed=True), "c.npz", "spec.seed", "valid integer"),
    # found only once the model and the data are known: checked at upload on a shape-only model
    (_repair(layer_exclude=["downsample", "conv"]), "c.npz", "spec.repair.params.layer_exclude", "no Conv2d layer"),
    # MM-BD's 10 x 1024 optimised 8x8 images with their gradients and Adam moments: 10 MiB over 512 KiB
    (_spec(detect={"params": {"mm_starts": 1024, "detectors": ["max_margin"], "voting_detectors": ["max_margin"]}}),
     "c.npz", "spec.detect.params.mm_starts", "set mm_starts to at most 51"),
    (_spec(), "empty_images.npz", "clean_data", "at least one pixel"),
    # the seeded 20% hold-out of this clean_data is all of class 0: badnets to 0 had no image to trigger, which
    # the worker found only after the upload was queued
    (_spec(attack={"type": "badnets", "target": 0}), "all_target.npz", "spec.attack.target",
     "are of the attack's target class 0"),
])
def test_hostile_specs_are_422_at_their_field_and_store_nothing(env: tuple[TestClient, dict[str, str], Path],
                                                                spec: dict, clean: str, field: str, says: str) -> None:
    r = _post(env, spec, clean)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and says in r.json()["detail"], r.json()
    client, auth, _ = env
    assert client.get("/scans", headers=auth).json()["items"] == []


def test_the_same_upload_with_sane_values_is_accepted(env: tuple[TestClient, dict[str, str], Path]) -> None:
    r = _post(env, _repair(auto_candidates=[0.5, 0.1], layer_exclude=["downsample"]))
    assert r.status_code == 202, r.text
    r = _post(env, _spec(detect={"params": {"nc_batch_size": 16, "detectors": ["neural_cleanse"],
                                            "voting_detectors": ["neural_cleanse"]}}))
    assert r.status_code == 202, r.text
    # 10 x 1024 stamped images a step, over the 4096 one pass holds: run in chunks of 4 classes, so accepted
    r = _post(env, _spec(detect={"params": {"nc_batch_size": 1024, "detectors": ["neural_cleanse"],
                                            "voting_detectors": ["neural_cleanse"]}}))
    assert r.status_code == 202, r.text
