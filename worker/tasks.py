"""Thin Celery tasks: everything real happens in ``worker.runner``."""

from __future__ import annotations

from functools import lru_cache

from store.db import make_engine, make_session_factory
from store.objects import open_store
from store.queue import RUN_SCAN
from worker.celery_app import app, settings
from worker.runner import WorkerContext, execute_scan
from worker.webhooks import send_after_run


@lru_cache
def _context() -> WorkerContext:
    # built lazily in the pool process: engines and S3 clients must not cross a fork
    engine = make_engine(settings.resolved_database_url, settings.db_connect_timeout_s)
    store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url, settings.s3_region)
    return WorkerContext(settings=settings, sessions=make_session_factory(engine), store=store)


@app.task(name=RUN_SCAN, acks_late=True, reject_on_worker_lost=True)
def run_scan(scan_id: str) -> str:
    status = execute_scan(_context(), scan_id)
    # also after "skipped": a scan canceled before its claim has ended too; the outbox sends each webhook once
    send_after_run(app, _context().sessions, scan_id, settings.resolved_webhook_queue)
    return status
