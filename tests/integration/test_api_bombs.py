"""Bombs and malformed archives through ``POST /scans``: each is a 422 JSON answer naming the part, and nothing
is stored (no scan row, no object). The embedded configuration suffices: the loaders are what is tested here,
and their memory bounds are measured in tests/unit/test_upload_bombs.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.data.imageset import ImageSet
from core.models.registry import create_model
from store.db import make_engine, make_session_factory, upgrade_database
from store.models import Scan
from store.settings import Settings
from tests import hostile_files as hf
from tests.helpers import SPEC_MODEL, spec_json, write_npz, write_safetensors
from tests.integration.conftest import new_key

_MB = 1024 * 1024


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data = tmp_path_factory.mktemp("bombs-api")
    s = Settings(data_dir=data, database_url=None, broker_url=None, storage_url=None, log_json=False,
                 stale_sweep_interval_s=0)
    data.mkdir(parents=True, exist_ok=True)
    upgrade_database(s.resolved_database_url)
    return s


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, bytes]]:
    d = tmp_path_factory.mktemp("good")
    arch, k, c = SPEC_MODEL["architecture"], SPEC_MODEL["num_classes"], SPEC_MODEL.get("in_channels", 3)
    state = create_model(arch, k, c).state_dict()
    rng = np.random.default_rng(0)
    h = 8
    clean = ImageSet(rng.integers(0, 256, (12, h, h, c), dtype=np.uint8), rng.integers(0, k, 12))
    return {"model": ("model.safetensors", write_safetensors(d / "m.safetensors", state).read_bytes()),
            "clean_data": ("clean.npz", write_npz(d / "c.npz", clean).read_bytes())}


def _model_cases(tmp: Path) -> list[tuple[str, tuple[str, bytes], str]]:
    arch, k, c = SPEC_MODEL["architecture"], SPEC_MODEL["num_classes"], SPEC_MODEL.get("in_channels", 3)
    with torch.device("meta"):
        meta_state = create_model(arch, k, c).state_dict()
    torch.save(meta_state, tmp / "meta.pt")
    torch.save({"w": torch.eye(3).to_sparse()}, tmp / "sparse.pt")
    w = hf.RawTensor(hf.StorageRef(4), (4,))
    return [
        ("deflated storage", ("m.pt", hf.deflated_storage_bomb(tmp / "d.pt", 16 * _MB).read_bytes()), "compressed"),
        ("100k globals", ("attack_result.pt",
                          hf.backdoorbench_zip(tmp / "g.pt", hf.many_globals_pickle(100_000)).read_bytes()),
         "distinct globals"),
        ("encrypted record", ("m.pt", hf.patch_zip_member(hf.small_state_dict_zip(tmp / "e.pt"), "archive/data.pkl",
                                                          flag_bits=1).read_bytes()), "encrypted"),
        ("unknown method", ("m.pt", hf.patch_zip_member(hf.small_state_dict_zip(tmp / "u.pt"), "archive/data/0",
                                                        method=99).read_bytes()), "unknown method 99"),
        ("meta tensors", ("m.pt", (tmp / "meta.pt").read_bytes()), "'meta' device"),
        ("sparse tensor", ("m.pt", (tmp / "sparse.pt").read_bytes()), "sparse_coo"),
        ("shadowed OrderedDict", ("m.pt", hf.backdoorbench_zip(
            tmp / "s.pt", hf.torch_pickle(hf.ShadowedOrderedDict({"w": w}))).read_bytes()), "missing keys"),
    ]


def _data_cases(tmp: Path) -> list[tuple[str, tuple[str, bytes], str]]:
    png = hf.png((8, 8), mode="L")
    return [
        ("npz deflate bomb", ("c.npz", hf.npz_bomb(tmp / "b.npz", 64 * _MB, side=8).read_bytes()), "-fold"),
        ("huge PNGs", ("c.zip", hf.huge_png_zip(tmp / "h.zip").read_bytes()), "4096x4096"),
        ("encrypted npz member", ("c.npz", hf.patch_zip_member(hf.small_npz(tmp / "e.npz"), "x.npy", flag_bits=1)
                                  .read_bytes()), "encrypted"),
        ("unknown npz method", ("c.npz", hf.patch_zip_member(hf.small_npz(tmp / "m.npz"), "y.npy", method=99)
                                .read_bytes()), "compression method 99"),
        ("huge class index", ("c.zip", hf.image_zip(tmp / "c.zip", {"0/a.png": png, "1/b.png": png,
                                                                     "99999999999999999999/c.png": png})
                              .read_bytes()), "class folder '99999999999999999999'"),
    ]


def _scan_rows(settings: Settings) -> int:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        n = session.scalar(select(func.count()).select_from(Scan))
    engine.dispose()
    return int(n or 0)


def _stored_objects(settings: Settings) -> list[Path]:
    root = settings.data_dir / "objects"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bombs_are_422_naming_the_part_and_nothing_is_stored(
    client: TestClient, settings: Settings, good: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    auth = {"Authorization": f"Bearer {new_key(settings)}"}
    cases = [("model", *c) for c in _model_cases(tmp_path)] + [("clean_data", *c) for c in _data_cases(tmp_path)]
    failures = []
    for part, name, upload, text in cases:
        r = client.post("/scans", headers=auth, data={"spec": spec_json()}, files={**good, part: upload})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"raw": r.text}
        if r.status_code != 422 or body.get("field") != part or text not in body.get("detail", ""):
            failures.append(f"{name}: {r.status_code} {str(body)[:300]}")
    assert not failures, "\n".join(failures)
    assert _scan_rows(settings) == 0
    assert _stored_objects(settings) == []
    # the same client still takes a good upload: nothing above broke the process
    r = client.post("/scans", headers=auth, data={"spec": spec_json()}, files=good)
    assert r.status_code == 202, r.text
