"""One scan, start to finish, for one delivery of its task: a plain function, tested without a broker."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.data.formats import DataLimits
from core.inputs import DATA_PARTS, InputError, ScanInputs, UploadedFile
from core.pipeline import run_pipeline
from core.progress import Progress, StopRequested
from core.spec import ScanSpec
from store import repository
from store.logs import scan_id_var
from store.models import Scan, ScanStatus
from store.objects import ObjectStore
from store.settings import Settings
from worker.db_retry import is_connection_error, with_db_retry
from worker.heartbeat import Heartbeat

log = logging.getLogger("antidote.worker")
MAX_ATTEMPTS = 3
# what an artifact file is, by its suffix (the pipeline writes weights as .safetensors, triggers as .png, the
# per-sample scores of repair_data as .csv)
_MEDIA_TYPES = {".safetensors": "application/octet-stream", ".png": "image/png", ".csv": "text/csv"}


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore


def execute_scan(ctx: WorkerContext, scan_id: str) -> str:
    """Claim, run and record one scan; returns the status it ended in (or ``skipped``)."""
    token = scan_id_var.set(scan_id)
    try:
        claimed = _claim(ctx, scan_id)
        if claimed is None:
            log.info("nothing to do for this delivery")
            return "skipped"
        spec, inputs_meta, attempt = claimed
        log.info("scan started", extra={"attempt": attempt})
        with Heartbeat(ctx.sessions, scan_id, ctx.settings.worker_heartbeat_s):
            return _run(ctx, scan_id, spec, inputs_meta)
    finally:
        scan_id_var.reset(token)


def _claim(ctx: WorkerContext, scan_id: str) -> tuple[dict, dict, int] | None:
    """The claimed scan's (spec, inputs, attempt), or None; waits out a database outage up to the time limit."""
    def claim() -> tuple[dict, dict, int] | None:
        with ctx.sessions() as session:
            scan = repository.claim_scan(session, scan_id, MAX_ATTEMPTS)
            return None if scan is None else (scan.spec, scan.inputs, scan.attempts)

    return with_db_retry(claim, time.monotonic() + ctx.settings.scan_time_limit_s, "claim the scan",
                         ctx.settings.db_retry_max_interval_s)


def _write_progress(ctx: WorkerContext, scan_id: str, stage: str, progress: float,
                    timings: dict[str, float]) -> bool:
    """Progress is best effort: during a database outage the scan goes on without it (the end is retried).
    Returns whether the client asked to cancel."""
    try:
        with ctx.sessions() as session:
            return repository.record_progress(session, scan_id, stage, round(progress, 4), timings)
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        log.warning("progress not recorded: the database is unavailable")
        return False


def _finish(ctx: WorkerContext, scan_id: str, report: dict, artifacts: dict, timings: dict[str, float],
            deadline: float) -> bool:
    """Record success, retried through an outage; True also when an earlier try's commit went through but its
    answer was lost with the connection (the scan is then already ``succeeded``)."""
    def finish() -> bool:
        with ctx.sessions() as session:
            if repository.finish_scan(session, scan_id, report, artifacts, timings):
                return True
            return session.scalar(select(Scan.status).where(Scan.id == scan_id)) == ScanStatus.succeeded.value

    return with_db_retry(finish, deadline, "record the result", ctx.settings.db_retry_max_interval_s)


class _ScanSink:
    """Where a scan's progress goes: its database row (at most twice a second, and at every stage change);
    it says to stop when the client asked to cancel (read with each write) or the time limit has passed."""

    WRITE_INTERVAL_S = 0.5

    def __init__(self, ctx: WorkerContext, scan_id: str, deadline: float) -> None:
        self.ctx, self.scan_id, self.deadline = ctx, scan_id, deadline
        self.stage, self.fraction = "starting", 0.0  # what claim_scan wrote
        self.timings: dict[str, float] = {}
        self.canceled = False
        self._last_write = float("-inf")

    def report(self, stage: str, fraction: float, timings: MutableMapping[str, float]) -> None:
        changed = stage != self.stage
        self.stage, self.fraction, self.timings = stage, fraction, dict(timings)
        if changed or time.monotonic() - self._last_write >= self.WRITE_INTERVAL_S:
            self._write()

    def stop_reason(self) -> str | None:
        if not self.canceled and time.monotonic() - self._last_write >= self.WRITE_INTERVAL_S:
            self._write()  # also the heartbeat that tells the stale-scan sweep this scan is alive
        if self.canceled:
            return "canceled"
        return "time_limit" if time.monotonic() > self.deadline else None

    def _write(self) -> None:
        self._last_write = time.monotonic()
        if _write_progress(self.ctx, self.scan_id, self.stage, self.fraction, self.timings):
            self.canceled = True


def _run(ctx: WorkerContext, scan_id: str, spec_json: dict, inputs_meta: dict) -> str:
    sink = _ScanSink(ctx, scan_id, time.monotonic() + ctx.settings.scan_time_limit_s)
    progress = Progress(sink)
    timings = progress.timings
    work = Path(tempfile.mkdtemp(prefix=f"antidote-{scan_id}-"))
    try:
        try:
            spec = ScanSpec.model_validate(spec_json)
        except ValidationError as exc:  # stored under rules since tightened (queued before an upgrade)
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in ("spec", *first["loc"]))
            raise InputError(loc, f"the stored spec is not valid under this version's rules: {first['msg']}") from exc
        inputs = _fetch_inputs(ctx.store, inputs_meta, work)
        limits = DataLimits(**ctx.settings.data_limits())
        progress.check()  # fetching the inputs may have used up the time, or the client canceled meanwhile
        result = run_pipeline(spec, inputs, work, ctx.settings.device, progress, limits)
        log.info("pipeline finished")  # the chaos tests count these: more than one per scan is a duplicate run
        artifacts: dict[str, dict] = {}
        for name, path in result.artifacts.items():
            suffix = path.suffix.lower()
            key = f"scans/{scan_id}/artifacts/{name}{suffix}"
            ctx.store.put_file(key, path)
            artifacts[name] = {"key": key, "size": path.stat().st_size,
                               "media_type": _MEDIA_TYPES.get(suffix, "application/octet-stream"),
                               "filename": f"{name}{suffix}"}
        if not _finish(ctx, scan_id, result.report, artifacts, result.report["timings"], _end_deadline(ctx)):
            ctx.store.delete_prefix(f"scans/{scan_id}/artifacts")
            log.info("scan was canceled while finishing")
            return "canceled"
        log.info("scan succeeded", extra={"timings": result.report["timings"]})
        return ScanStatus.succeeded.value
    except StopRequested as stop:
        progress.close()
        if stop.reason == "canceled":
            _end(ctx, scan_id, ScanStatus.canceled, None, None, timings)
            log.info("scan canceled by the client")
            return ScanStatus.canceled.value
        msg = (f"the scan ran past its time limit of {ctx.settings.scan_time_limit_s} s; use fewer images "
               "or a smaller model, or ask the operator to raise ANTIDOTE_SCAN_TIME_LIMIT_S")
        _end(ctx, scan_id, ScanStatus.failed, "time_limit", msg, timings)
        log.warning("scan hit its time limit")
        return ScanStatus.failed.value
    except InputError as exc:
        progress.close()
        _end(ctx, scan_id, ScanStatus.failed, "invalid_input", str(exc), timings)
        log.info("scan failed on its input: %s", exc)
        return ScanStatus.failed.value
    except Exception as exc:
        progress.close()
        if out_of_memory(exc):
            _free_device_memory()
            log.warning("scan ran out of memory in stage %s: %s", sink.stage, str(exc).splitlines()[0][:300])
            _end(ctx, scan_id, ScanStatus.failed, "out_of_memory", _oom_message(ctx.settings.device, sink.stage),
                 timings)
            return ScanStatus.failed.value
        log.exception("scan failed")
        msg = (f"internal error ({type(exc).__name__}) while running the scan; it was logged with the scan id, "
               "tell the operator")
        _end(ctx, scan_id, ScanStatus.failed, "internal_error", msg, timings)
        return ScanStatus.failed.value
    finally:
        shutil.rmtree(work, ignore_errors=True)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: CUDA's ``torch.OutOfMemoryError``, Python's ``MemoryError`` (numpy)
    or the CPU allocator's ``RuntimeError`` (torch raises no dedicated type on the CPU)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _oom_message(device: str, stage: str) -> str:
    return (f"the worker ran out of memory ({device}) in stage {stage!r}: a batch of this model on these images "
            "does not fit; lower the spec's batch sizes (spec.repair.params.batch_size, spec.detect.params."
            "nc_batch_size, fi_batch_size or mm_starts, spec.repair_data.params.batch_size), upload smaller "
            "images, or ask the operator for a worker with more memory")


def _free_device_memory() -> None:
    """Give the failed scan's cached CUDA blocks back, so the worker's next scan starts with the device empty."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _end(ctx: WorkerContext, scan_id: str, status: ScanStatus, code: str | None, message: str | None,
         timings: dict[str, float]) -> None:
    def end() -> None:
        with ctx.sessions() as session:
            repository.end_scan(session, scan_id, status, code, message, timings)

    with_db_retry(end, _end_deadline(ctx), "record the end of the scan", ctx.settings.db_retry_max_interval_s)


def _end_deadline(ctx: WorkerContext) -> float:
    """How long a final write may wait for the database: a time limit's worth, but within Celery's hard limit
    (time limit + 120 s, store/queue.py), which would kill the task with the write still pending."""
    return time.monotonic() + min(ctx.settings.scan_time_limit_s, 90)


def _fetch_inputs(store: ObjectStore, meta: dict, work: Path) -> ScanInputs:
    files: dict[str, UploadedFile | None] = {}
    for part in ("model", *DATA_PARTS):
        info = meta.get(part)
        if info is None:
            files[part] = None
            continue
        dest = work / f"{part}{Path(info['filename']).suffix.lower()}"
        store.get_file(info["key"], dest)
        files[part] = UploadedFile(dest, info["filename"])
    model, clean = files.pop("model"), files.pop("clean_data")
    assert model is not None and clean is not None
    return ScanInputs(model=model, clean_data=clean, **files)
