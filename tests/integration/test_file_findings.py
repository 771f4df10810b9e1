"""Through the API: a code-carrying checkpoint is refused at upload with its findings, never run; /metrics
asks for ANTIDOTE_METRICS_TOKEN when it is set and stays open when it is not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from core.data.imageset import ImageSet
from core.models.registry import create_model
from store.settings import Settings
from tests.helpers import spec_json, write_npz

pytestmark = pytest.mark.integration


class _System:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.canary}",))


def test_code_carrying_checkpoint_refused_with_findings(prod_client: TestClient, auth: dict[str, str],
                                                        tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    model = tmp_path / "evil.pt"
    torch.save({"state_dict": create_model("resnet20", 10, 1).state_dict(), "x": _System(canary)}, model)
    rng = np.random.default_rng(0)
    clean = write_npz(tmp_path / "c.npz", ImageSet(rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8),
                                                   rng.integers(0, 10, 4)))
    r = prod_client.post("/scans", headers=auth, data={"spec": spec_json()},
                         files={"model": ("evil.pt", model.read_bytes()), "clean_data": ("c.npz", clean.read_bytes())})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "model" and "carries code" in body["detail"]
    assert body["findings"][0]["severity"] == "high" and "system" in body["findings"][0]["message"]
    assert body["findings"][0]["location"]["member"].endswith("data.pkl")
    assert not canary.exists()


def test_metrics_token(prod_settings: Settings) -> None:
    from api.app import create_app

    with TestClient(create_app(prod_settings)) as open_client:
        assert open_client.get("/metrics").status_code == 200  # unset: as before
    settings = prod_settings.model_copy(update={"metrics_token": "s3cret-token"})
    with TestClient(create_app(settings)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            r = client.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["field"] == "Authorization", headers
        r = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200 and "antidote" in r.text
