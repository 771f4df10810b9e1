"""What mode repair_data costs the service around the method, on CIFAR-10's 50,000 training images.

Three measurements, each in a fresh process so that its peak RSS is its own:
- ``check``: ``core.inputs.load_inputs`` of a repair_data upload (the model, 2,500 clean images, the 50,000
  training images with their ``is_corrupt`` mask): what ``POST /scans`` runs before it answers 202, and the
  worker again before the pipeline (after one small check, as in a process that has served before).
- ``post``: the whole ``POST /scans`` of those files on the embedded default (multipart receive to temp files,
  the check, the copy to object storage, the row, the task) until the 202.
- ``account``: the pipeline's own per-sample work after the method: the identification quality against
  ``is_corrupt`` and the ``sample_scores`` CSV of 50,000 rows.

The labels have 20% symmetric noise (``is_corrupt`` marks the flipped ones); the model is an untrained
ResNet-20 (its weights do not change these costs). The method's own time and memory are bench/datarepair_bench.py's.

    python -m bench.repair_data_service_bench --out bench/results/repair_data_service.md
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPEC = {"mode": "repair_data", "model": {"architecture": "resnet20", "num_classes": 10, "in_channels": 3},
        "detect": {"enabled": False}}


def _kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match is not None, key
    return int(match.group(1))


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
    return _kib("VmRSS")


def prepare(work: Path) -> dict[str, Path]:
    """The upload's files under ``work``: CIFAR-10 train with 20% flipped labels and the mask, 2,500 test
    images as the clean set, an untrained ResNet-20."""
    import torch
    from safetensors.torch import save_file

    from bench.datasets import load_cifar10
    from core.models.registry import create_model

    train, test = load_cifar10()
    rng = np.random.default_rng(0)
    flip = rng.random(len(train)) < 0.2
    noisy = np.where(flip, (train.y + rng.integers(1, 10, len(train))) % 10, train.y)
    files = {"training_data": work / "train.npz", "clean_data": work / "clean.npz", "model": work / "m.safetensors"}
    np.savez(files["training_data"], x=train.x, y=noisy, is_corrupt=flip)
    np.savez(files["clean_data"], x=test.x[:2500], y=test.y[:2500])
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in create_model("resnet20", 10, 3).state_dict().items()},
              str(files["model"]))
    return files


def measure_check(files: dict[str, Path]) -> dict[str, object]:
    from core.data.formats import DataLimits
    from core.inputs import ScanInputs, UploadedFile, load_inputs
    from core.spec import ScanSpec
    from store.settings import Settings

    spec = ScanSpec.model_validate(SPEC)
    inputs = ScanInputs(**{part: UploadedFile(path, path.name) for part, path in files.items()})
    limits = DataLimits(**Settings().data_limits())
    _warm_up(spec, files, limits)
    base = _reset_peak()
    start = time.perf_counter()
    loaded = load_inputs(spec, inputs, limits)
    seconds = time.perf_counter() - start
    assert loaded.training is not None and loaded.training_is_corrupt is not None
    return {"seconds": round(seconds, 3), "peak_rss_growth_mib": round((_kib("VmHWM") - base) / 1024, 1),
            "training_images": len(loaded.training), "training_mib": round(loaded.training.x.nbytes / 2**20, 1)}


def _warm_up(spec: object, files: dict[str, Path], limits: object) -> None:
    """One check of a small upload (the clean set as training data) first: the first model build of a process
    imports parts of torch lazily (seconds and ~150 MiB once), which a running API has long done."""
    from core.inputs import ScanInputs, UploadedFile, load_inputs

    small = {**files, "training_data": files["clean_data"]}
    load_inputs(spec, ScanInputs(**{part: UploadedFile(path, path.name) for part, path in small.items()}),
                limits)  # type: ignore[arg-type]


def measure_post(files: dict[str, Path], work: Path) -> dict[str, object]:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store import repository
    from store.db import make_engine, make_session_factory, upgrade_database
    from store.settings import Settings

    settings = Settings(data_dir=work / "state", log_json=False, log_level="WARNING")
    settings.data_dir.mkdir()
    upgrade_database(settings.resolved_database_url)
    with make_session_factory(make_engine(settings.resolved_database_url))() as session:
        key = repository.create_api_key(session, "bench")
    from core.data.formats import DataLimits
    from core.spec import ScanSpec

    _warm_up(ScanSpec.model_validate(SPEC), files, DataLimits(**settings.data_limits()))
    with TestClient(create_app(settings)) as client:
        handles = {part: (path.name, path.open("rb"), "application/octet-stream") for part, path in files.items()}
        base = _reset_peak()
        start = time.perf_counter()
        r = client.post("/scans", headers={"Authorization": f"Bearer {key}"}, data={"spec": json.dumps(SPEC)},
                        files=handles)
        seconds = time.perf_counter() - start
        for _, f, _ in handles.values():
            f.close()
    assert r.status_code == 202, r.text
    return {"seconds": round(seconds, 3), "peak_rss_growth_mib": round((_kib("VmHWM") - base) / 1024, 1),
            "upload_mib": round(sum(p.stat().st_size for p in files.values()) / 2**20, 1)}


def measure_account(files: dict[str, Path], work: Path) -> dict[str, object]:
    from core.data.formats import load_training_set
    from core.metrics import identification_quality
    from core.pipeline import write_sample_scores

    training, _, corrupt = load_training_set(files["training_data"])
    assert corrupt is not None
    rng = np.random.default_rng(1)
    scores = rng.normal(size=len(training)) + 2.0 * corrupt  # any finite scores: the cost does not depend on them
    flagged = scores > 1.5
    new_labels = np.where(flagged, rng.integers(0, 10, len(training)), training.y)
    base = _reset_peak()
    start = time.perf_counter()
    quality = identification_quality(scores, flagged, corrupt)
    path = write_sample_scores(work / "sample_scores.csv", training.y, scores, flagged, new_labels, corrupt)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "peak_rss_growth_mib": round((_kib("VmHWM") - base) / 1024, 1),
            "csv_mib": round(path.stat().st_size / 2**20, 2), "auroc": round(float(quality["auroc"]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/repair_data_service.md"))
    parser.add_argument("--measure", choices=("check", "post", "account"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child: one measurement, its JSON on stdout
        files = {p: args.work / n for p, n in (("training_data", "train.npz"), ("clean_data", "clean.npz"),
                                               ("model", "m.safetensors"))}
        fn = {"check": lambda: measure_check(files), "post": lambda: measure_post(files, args.work),
              "account": lambda: measure_account(files, args.work)}[args.measure]
        print(json.dumps(fn()))
        return
    from bench.provenance import commit, machine

    rows = {}
    with tempfile.TemporaryDirectory(prefix="antidote-rd-bench-") as tmp:
        work = Path(tmp)
        prepare(work)
        for name in ("check", "post", "account"):
            run = subprocess.run([sys.executable, "-m", "bench.repair_data_service_bench", "--measure", name,
                                  "--work", str(work)], capture_output=True, text=True, check=True)
            rows[name] = json.loads(run.stdout.strip().splitlines()[-1])
            print(name, rows[name], flush=True)
    lines = [f"Machine: {machine()}; commit {commit()}; `python -m bench.repair_data_service_bench`.", "",
             "| step | seconds | peak RSS growth (MiB) | notes |", "| --- | --- | --- | --- |",
             f"| upload check (`load_inputs`) | {rows['check']['seconds']} | {rows['check']['peak_rss_growth_mib']} | "
             f"{rows['check']['training_images']} training images = {rows['check']['training_mib']} MiB of pixels |",
             f"| `POST /scans` to 202 (embedded) | {rows['post']['seconds']} | {rows['post']['peak_rss_growth_mib']} | "
             f"upload {rows['post']['upload_mib']} MiB |",
             f"| identification + `sample_scores` CSV | {rows['account']['seconds']} | "
             f"{rows['account']['peak_rss_growth_mib']} | CSV {rows['account']['csv_mib']} MiB |"]
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
