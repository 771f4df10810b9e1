"""Scans whose task the broker lost (a Redis restarted without persistence) are sent again: the database is
the source of truth, and the worker's idempotent claim makes an extra delivery harmless."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from fastapi import FastAPI
from sqlalchemy import select

from store.models import Scan, ScanStatus, utcnow
from store.queue import enqueue_scan, scan_ids_in_broker, take_broker_lock
from store.settings import Settings

log = logging.getLogger("antidote.api")
RECHECK_PAUSE_S = 1.0  # a task between the queue and the unacked hash is in neither for a moment
LOCK_TTL_S = 10


def redeliver_lost_scans(app: FastAPI) -> list[str]:
    """Send again every scan queued for longer than ``broker_recovery_grace_s`` whose task is in the broker
    neither as waiting nor as delivered (checked twice, a second apart); returns their ids."""
    settings: Settings = app.state.settings
    missing = _missing(app, settings)
    if not missing:
        return []
    time.sleep(RECHECK_PAUSE_S)
    missing &= _missing(app, settings)
    # API replicas sweep on their own clocks: one sends, the others see its tasks on their next sweep
    if not missing or not take_broker_lock(settings, "redeliver", LOCK_TTL_S):
        return []
    for scan_id in sorted(missing):
        enqueue_scan(app.state.celery, scan_id, settings.queue)
        log.warning("sent a scan again: its task was lost by the broker", extra={"scan_id": scan_id})
    return sorted(missing)


def _missing(app: FastAPI, settings: Settings) -> set[str]:
    if settings.embedded_broker:
        return set()
    cutoff = utcnow() - timedelta(seconds=settings.broker_recovery_grace_s)
    with app.state.sessions() as session:
        queued = set(session.scalars(select(Scan.id).where(Scan.status == ScanStatus.queued.value,
                                                           Scan.created_at < cutoff)).all())
    if not queued:
        return set()
    in_broker = scan_ids_in_broker(settings)  # read after the database: a task sent meanwhile is then seen
    return set() if in_broker is None else queued - in_broker
