"""``antidote serve``: the API, plus a worker when the broker is the embedded one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import uvicorn

from store import repository, webhooks
from store.db import make_engine, make_session_factory, upgrade_database
from store.models import utcnow
from store.queue import enqueue_scan, make_celery
from store.settings import Settings

log = logging.getLogger("antidote.serve")


def worker_command(settings: Settings, concurrency: int = 1) -> list[str]:
    """One scan at a time per worker process (one GPU each); prefork so that time limits can kill a child."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", settings.queue,
            "--concurrency", str(concurrency), "--prefetch-multiplier", "1", "--loglevel",
            settings.log_level.upper(), "--without-gossip", "--without-mingle"]


def redeliver_unfinished(settings: Settings) -> int:
    """Embedded restart: the folder broker may hold stale or lost messages, so the database decides.

    Every queued or running scan is delivered again; running ones were cut off by the restart and start
    over (the worker's claim counts attempts, and a finished scan's extra delivery is skipped). Every webhook
    delivery that had not ended is queued again too (store/webhooks.py)."""
    queue_folder = settings.broker_folder / "queue"
    shutil.rmtree(queue_folder, ignore_errors=True)
    queue_folder.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    celery = make_celery(settings)
    with sessions() as session:
        repository.requeue_running(session)
        ids = repository.unfinished_scan_ids(session)
        webhooks.unsend_unfinished(session)  # their tasks were in the folder too
    for scan_id in ids:
        enqueue_scan(celery, scan_id, settings.queue)
    webhooks.send_unsent(celery, sessions, settings.resolved_webhook_queue, utcnow())
    engine.dispose()
    return len(ids)


def serve(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    """The API in ``workers`` processes (each with its own pools), and exactly one embedded Celery worker."""
    from api.app import create_app

    if workers < 1:
        raise ValueError("--workers must be at least 1")

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.database_url is None:
        # the embedded database is ours to create; a shared one is migrated once by `antidote migrate`
        upgrade_database(settings.resolved_database_url)
    worker: subprocess.Popen[bytes] | None = None
    if settings.embedded_broker:
        n = redeliver_unfinished(settings)
        if n:
            log.info("delivering %d unfinished scans again", n)
        worker = subprocess.Popen(worker_command(settings), preexec_fn=_die_with_parent)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; turning them into SystemExit lets the
    # finally below stop the worker instead of leaving it orphaned
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    try:
        options: dict[str, Any] = {"host": host, "port": port, "log_config": None, "access_log": False,
                                   **server_limits(settings)}
        if workers == 1:
            uvicorn.run(create_app(settings), **options)
        else:
            # uvicorn's worker processes import the app themselves; they read these settings from the environment
            os.environ.update(settings_environment(settings))
            uvicorn.run("api.app:app_from_environment", factory=True, workers=workers, **options)
    finally:
        if worker is not None:
            stop_worker(worker)


def server_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn options for the limits that live in the HTTP server (the embedded default and production
    alike): the head's byte cap and time limit (``api/http_protocol.py``)."""
    from api.http_protocol import GuardedHttpToolsProtocol, HeadLimits

    GuardedHttpToolsProtocol.limits = HeadLimits.of(settings)
    return {"http": GuardedHttpToolsProtocol, "h11_max_incomplete_event_size": settings.max_header_bytes}


def settings_environment(settings: Settings) -> dict[str, str]:
    """``ANTIDOTE_*`` variables that rebuild ``settings`` in another process (set fields only)."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        env[f"ANTIDOTE_{name.upper()}"] = text
    return env


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL if `serve` dies first (even by SIGKILL), so no orphan keeps the queue."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_worker(worker: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Warm shutdown (the running scan is delivered again on the next start), then SIGKILL."""
    if worker.poll() is None:
        worker.terminate()
    try:
        worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(timeout=10)
