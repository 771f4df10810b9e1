"""The worker's scan runner on the embedded default (SQLite + local files), without a broker."""

from __future__ import annotations

import fractions
import threading
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from store import repository
from store.db import make_engine, make_session_factory, upgrade_database
from store.models import Scan
from store.objects import LocalObjectStore
from store.settings import Settings
from tests.helpers import NO_DETECT, SPEC_MODEL, backdoored_digits, write_npz, write_safetensors
from worker.runner import MAX_ATTEMPTS, WorkerContext, execute_scan


class _HookedStore(LocalObjectStore):
    """A local store that runs a hook when the worker fetches an input (to act 'while the scan runs')."""

    hook = staticmethod(lambda: None)

    def get_file(self, key: str, dest: Path) -> None:
        self.hook()
        super().get_file(key, dest)


@pytest.fixture
def ctx(embedded_settings: Settings) -> WorkerContext:
    embedded_settings.data_dir.mkdir(parents=True)
    upgrade_database(embedded_settings.resolved_database_url)
    engine = make_engine(embedded_settings.resolved_database_url)
    return WorkerContext(embedded_settings, make_session_factory(engine),
                         _HookedStore(embedded_settings.data_dir / "objects"))


def _queue_scan(ctx: WorkerContext, tmp: Path, spec: dict | None = None, model_file: Path | None = None) -> str:
    state, clean, test = backdoored_digits()
    scan_id = repository.new_id()
    inputs = {}
    model_file = model_file or write_safetensors(tmp / "m.safetensors", state)
    for part, path in (("model", model_file),
                       ("clean_data", write_npz(tmp / "c.npz", clean)), ("test_data", write_npz(tmp / "t.npz", test))):
        key = f"scans/{scan_id}/inputs/{part}{path.suffix}"
        ctx.store.put_file(key, path)
        inputs[part] = {"key": key, "filename": path.name, "size": path.stat().st_size, "sha256": "x"}
    with ctx.sessions() as session:
        key = repository.create_api_key(session, "t")
        tenant = repository.tenant_for_key(session, key)
        assert tenant is not None
        repository.add_scan(session, scan_id, tenant.id, "scan",
                            spec or {"mode": "scan", "model": SPEC_MODEL, "attack": {"type": "badnets"},
                                    "detect": NO_DETECT}, inputs)
    return scan_id


def _scan(sessions: sessionmaker[Session], scan_id: str) -> Scan:
    with sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None
        return scan


def test_success_then_a_repeated_delivery_is_skipped(ctx: WorkerContext, tmp_path: Path) -> None:
    scan_id = _queue_scan(ctx, tmp_path)
    assert execute_scan(ctx, scan_id) == "succeeded"
    scan = _scan(ctx.sessions, scan_id)
    assert scan.status == "succeeded" and scan.progress == 1.0 and scan.attempts == 1
    assert scan.report is not None and scan.report["before"]["asr"] > 0.9
    assert scan.report["model"]["neutralised_globals"] == [] and scan.report["model"]["neutralised_globals_count"] == 0
    assert set(scan.report["timings"]) == {"load", "evaluate_before", "detect", "report"}
    assert execute_scan(ctx, scan_id) == "skipped"
    assert _scan(ctx.sessions, scan_id).attempts == 1


def test_cancel_while_running(ctx: WorkerContext, tmp_path: Path) -> None:
    scan_id = _queue_scan(ctx, tmp_path)

    def client_cancels() -> None:
        with ctx.sessions() as session:
            scan = session.get(Scan, scan_id)
            assert scan is not None and scan.status == "running"
            repository.request_cancel(session, scan)

    ctx.store.hook = client_cancels  # type: ignore[attr-defined]
    assert execute_scan(ctx, scan_id) == "canceled"
    assert _scan(ctx.sessions, scan_id).status == "canceled"


def test_cancel_from_a_stale_read_does_not_overwrite_a_claim(ctx: WorkerContext, tmp_path: Path) -> None:
    """DELETE read the scan as queued, a worker claimed it before the cancel was written: the scan stays
    running with the cancel requested (the worker ends it), instead of a running scan marked canceled."""
    scan_id = _queue_scan(ctx, tmp_path)
    with ctx.sessions() as api_session:
        stale = api_session.get(Scan, scan_id)
        assert stale is not None and stale.status == "queued"
        with ctx.sessions() as worker_session:
            assert repository.claim_scan(worker_session, scan_id, MAX_ATTEMPTS) is not None
        repository.request_cancel(api_session, stale)
        assert stale.status == "running" and stale.cancel_requested and stale.finished_at is None
    scan = _scan(ctx.sessions, scan_id)
    assert scan.status == "running" and scan.cancel_requested


def test_cancel_of_a_queued_scan_is_immediate(ctx: WorkerContext, tmp_path: Path) -> None:
    scan_id = _queue_scan(ctx, tmp_path)
    with ctx.sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None
        repository.request_cancel(session, scan)
        assert scan.status == "canceled" and scan.finished_at is not None
    assert execute_scan(ctx, scan_id) == "skipped"


def test_time_limit_fails_with_an_actionable_message(ctx: WorkerContext, tmp_path: Path) -> None:
    scan_id = _queue_scan(ctx, tmp_path)
    ctx.settings = ctx.settings.model_copy(update={"scan_time_limit_s": 1})
    ctx.store.hook = lambda: time.sleep(0.4)  # type: ignore[attr-defined]
    assert execute_scan(ctx, scan_id) == "failed"
    scan = _scan(ctx.sessions, scan_id)
    assert scan.error_code == "time_limit" and "ANTIDOTE_SCAN_TIME_LIMIT_S" in (scan.error_message or "")


def test_input_that_turns_out_bad_fails_with_invalid_input(ctx: WorkerContext, tmp_path: Path) -> None:
    spec = {"mode": "scan", "model": {**SPEC_MODEL, "architecture": "preactresnet18"}, "detect": NO_DETECT}
    scan_id = _queue_scan(ctx, tmp_path, spec)
    assert execute_scan(ctx, scan_id) == "failed"
    scan = _scan(ctx.sessions, scan_id)
    assert scan.error_code == "invalid_input" and "model:" in (scan.error_message or "")


def test_a_stored_spec_the_rules_now_refuse_fails_as_invalid_input(ctx: WorkerContext, tmp_path: Path) -> None:
    """A scan queued before an upgrade tightened the spec (here: a detector named twice) fails naming the field,
    not with an internal error; the scan row and its inputs stay."""
    spec = {"mode": "scan", "model": SPEC_MODEL, "detect": {"params": {"detectors": ["neural_cleanse"] * 2}}}
    scan_id = _queue_scan(ctx, tmp_path, spec)
    assert execute_scan(ctx, scan_id) == "failed"
    scan = _scan(ctx.sessions, scan_id)
    assert scan.error_code == "invalid_input", scan.error_message
    assert "spec.detect.params.detectors" in (scan.error_message or "") and "at most once" in (scan.error_message or "")
    assert scan.inputs["model"]["key"]


def test_storage_failure_is_an_internal_error(ctx: WorkerContext, tmp_path: Path) -> None:
    scan_id = _queue_scan(ctx, tmp_path)

    def broken() -> None:
        raise OSError("disk on fire")

    ctx.store.hook = broken  # type: ignore[attr-defined]
    assert execute_scan(ctx, scan_id) == "failed"
    scan = _scan(ctx.sessions, scan_id)
    assert scan.error_code == "internal_error" and "OSError" in (scan.error_message or "")


def test_an_allocation_failure_is_out_of_memory_naming_what_to_lower(ctx: WorkerContext, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that does not fit failed as internal_error ("tell the operator"); the user can fix it. The CPU
    allocator's own failure (a real 40 TB request), and CUDA's OutOfMemoryError, name the stage and the batch sizes."""
    from worker import runner

    def allocate(spec, inputs, work, device, progress, limits):  # noqa: ANN001, ANN202 - run_pipeline's signature
        progress.stage("repair:finetune", 0.0, 1.0).update(0.5)
        torch.empty(10**13)  # 40 TB: the allocator refuses at once

    monkeypatch.setattr(runner, "run_pipeline", allocate)
    scan_id = _queue_scan(ctx, tmp_path)
    assert execute_scan(ctx, scan_id) == "failed"
    scan = _scan(ctx.sessions, scan_id)
    assert scan.error_code == "out_of_memory", scan.error_message
    assert "repair:finetune" in (scan.error_message or "") and "spec.repair.params.batch_size" in (scan.error_message
                                                                                                  or "")
    assert runner.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert runner.out_of_memory(MemoryError()) and not runner.out_of_memory(RuntimeError("shape mismatch"))


def test_a_scan_that_keeps_killing_its_worker_fails(ctx: WorkerContext, tmp_path: Path) -> None:
    scan_id = _queue_scan(ctx, tmp_path)
    with ctx.sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None
        scan.status, scan.attempts = "running", MAX_ATTEMPTS
        session.commit()
    assert execute_scan(ctx, scan_id) == "skipped"
    assert _scan(ctx.sessions, scan_id).error_code == "worker_lost"


def _repair_spec(**params: object) -> dict:
    return {"mode": "repair", "model": SPEC_MODEL, "attack": {"type": "badnets"}, "detect": NO_DETECT,
            "repair": {"method": "finetune", "params": params}}


def test_time_limit_stops_a_repair_inside_its_training_loop(ctx: WorkerContext, tmp_path: Path) -> None:
    """300 epochs would take minutes; core polls the reporter between batches, so the limit ends it."""
    limit = 12
    scan_id = _queue_scan(ctx, tmp_path, _repair_spec(epochs=300, batch_size=16))
    ctx.settings = ctx.settings.model_copy(update={"scan_time_limit_s": limit})
    started = time.monotonic()
    assert execute_scan(ctx, scan_id) == "failed"
    assert time.monotonic() - started < limit + 15
    scan = _scan(ctx.sessions, scan_id)
    assert scan.error_code == "time_limit" and scan.stage == "repair:finetune"
    assert {"load", "evaluate_before", "repair"} <= set(scan.timings or {})


def test_cancel_while_repairing_is_honoured_from_core(ctx: WorkerContext, tmp_path: Path) -> None:
    scan_id = _queue_scan(ctx, tmp_path, _repair_spec(epochs=300, batch_size=16))
    stop = threading.Event()

    def client_cancels_once_repair_runs() -> None:
        while not stop.wait(0.2):
            with ctx.sessions() as session:
                scan = session.get(Scan, scan_id)
                if scan is not None and (scan.stage or "").startswith("repair:"):
                    repository.request_cancel(session, scan)
                    return

    client = threading.Thread(target=client_cancels_once_repair_runs)
    client.start()
    try:
        assert execute_scan(ctx, scan_id) == "canceled"
    finally:
        stop.set()
        client.join()
    scan = _scan(ctx.sessions, scan_id)
    assert scan.status == "canceled" and "repair" in (scan.timings or {})


class _Opaque:
    """Pickles as a harmless stdlib global that the BackdoorBench loader must neutralise, not import."""

    def __reduce__(self) -> tuple:
        return (fractions.Fraction, (1, 3))


def test_neutralised_globals_reach_the_report(ctx: WorkerContext, tmp_path: Path) -> None:
    state, _, _ = backdoored_digits()
    path = tmp_path / "attack_result.pt"
    torch.save({"model_name": SPEC_MODEL["architecture"], "num_classes": SPEC_MODEL["num_classes"],
                "model": state, "bd_test": _Opaque()}, path)
    scan_id = _queue_scan(ctx, tmp_path, model_file=path)
    assert execute_scan(ctx, scan_id) == "succeeded"
    report = _scan(ctx.sessions, scan_id).report
    assert report is not None and report["model"]["format"] == "backdoorbench"
    assert "fractions.Fraction" in report["model"]["neutralised_globals"]
    assert report["model"]["neutralised_globals_count"] >= len(report["model"]["neutralised_globals"]) >= 1


def test_progress_reaches_the_database_at_most_twice_a_second(ctx: WorkerContext, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-batch reports are cheap: only stage changes and one write per half second reach the row."""
    from worker import runner

    scan_id = _queue_scan(ctx, tmp_path)
    writes: list[str] = []
    real = repository.record_progress

    def counting(session: Session, sid: str, stage: str, progress: float, timings: dict[str, float]) -> bool:
        writes.append(stage)
        return real(session, sid, stage, progress, timings)

    monkeypatch.setattr(runner.repository, "record_progress", counting)
    sink = runner._ScanSink(ctx, scan_id, deadline=time.monotonic() + 60)
    progress = runner.Progress(sink)
    started = time.monotonic()
    stage = progress.stage("evaluate_before", 0.0, 1.0)
    for i in range(1000):
        stage.update(i / 1000)
        stage.check()
    elapsed = time.monotonic() - started
    # the stage change, then at most one write per half second (a few ms here, unless the machine stalls)
    assert writes[0] == "starting"  # the first poll for the cancel flag, before any stage
    assert set(writes[1:]) == {"evaluate_before"}
    assert len(writes) - 1 <= 1 + elapsed / runner._ScanSink.WRITE_INTERVAL_S
    progress.stage("report", 0.0, 1.0)
    assert writes[-1] == "report"
    sink.deadline = time.monotonic() - 1
    assert progress.should_stop() == "time_limit"


def test_trigger_artifacts_are_stored_as_png(ctx: WorkerContext, tmp_path: Path) -> None:
    """The runner takes each artifact's suffix and media type from its file (detector triggers are PNGs)."""
    # the loosest level (p < 0.5) and the feature inversion, so that this small backdoored model has a suspected
    # class whose trigger is stored (Neural Cleanse at 60 steps found none where the model trained on two threads)
    detect = {"params": {"detectors": ["feature_inversion"], "fi_steps": 60, "max_images": 200, "p_value": 0.5}}
    scan_id = _queue_scan(ctx, tmp_path, {"mode": "scan", "model": SPEC_MODEL, "detect": detect})
    assert execute_scan(ctx, scan_id) == "succeeded"
    scan = _scan(ctx.sessions, scan_id)
    assert scan.report is not None and scan.report["verdict"]["label"] in ("clean", "suspicious", "backdoored")
    expected = {f"trigger_class_{k}" for k in scan.report["verdict"]["suspected_targets"]}
    assert expected and set(scan.artifacts or {}) == expected
    for name, meta in (scan.artifacts or {}).items():
        assert meta["media_type"] == "image/png" and meta["filename"] == f"{name}.png"
        assert b"".join(ctx.store.iter_bytes(meta["key"])).startswith(b"\x89PNG")
