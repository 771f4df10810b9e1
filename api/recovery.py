"""Scans whose task the broker lost (a Redis restarted without persistence, or flushed) are sent again: the
database is the source of truth, and the worker's idempotent claim makes an extra delivery harmless."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from fastapi import FastAPI
from sqlalchemy import and_, or_, select, update

from store.models import Scan, ScanStatus, utcnow
from store.queue import enqueue_scan, scan_ids_in_broker, take_broker_lock
from store.settings import Settings

log = logging.getLogger("antidote.api")
RECHECK_PAUSE_S = 1.0  # a task between the queue and the unacked hash is in neither for a moment
LOCK_TTL_S = 10
SILENT_BEATS = 3  # a running scan this many heartbeats silent has lost its worker


def redeliver_lost_scans(app: FastAPI) -> list[str]:
    """Send again every scan whose task is in the broker neither as waiting nor as delivered (checked twice,
    a second apart): queued for longer than ``broker_recovery_grace_s``, or running but silent for
    ``SILENT_BEATS`` worker heartbeats (its worker died and the broker forgot its task, so no redelivery will
    come; it goes back to ``queued`` first). Returns their ids."""
    settings: Settings = app.state.settings
    first = _missing(app, settings)
    if not first:
        return []
    time.sleep(RECHECK_PAUSE_S)
    second = _missing(app, settings)
    missing = {scan_id: seen for scan_id, seen in second.items() if first.get(scan_id) == seen}
    # API replicas sweep on their own clocks: one sends, the others see its tasks on their next sweep
    if not missing or not take_broker_lock(settings, "redeliver", LOCK_TTL_S):
        return []
    sent = []
    for scan_id, (status, updated_at) in sorted(missing.items()):
        if status == ScanStatus.running.value and not _requeue(app, scan_id, updated_at):
            continue  # it showed a sign of life meanwhile
        enqueue_scan(app.state.celery, scan_id, settings.queue)
        sent.append(scan_id)
        log.warning("sent a scan again: its task was lost by the broker", extra={"scan_id": scan_id,
                                                                               "was": status})
    return sent


def _missing(app: FastAPI, settings: Settings) -> dict[str, tuple[str, datetime]]:
    """Scan id -> (status, updated_at) of the candidates whose task the broker does not hold."""
    if settings.embedded_broker:
        return {}
    now = utcnow()
    waiting = and_(Scan.status == ScanStatus.queued.value,
                   Scan.created_at < now - timedelta(seconds=settings.broker_recovery_grace_s))
    condition = waiting
    if settings.worker_heartbeat_s > 0:
        silent = now - timedelta(seconds=max(SILENT_BEATS * settings.worker_heartbeat_s,
                                             settings.broker_recovery_grace_s))
        condition = or_(waiting, and_(Scan.status == ScanStatus.running.value, Scan.updated_at < silent))
    with app.state.sessions() as session:
        rows = session.execute(select(Scan.id, Scan.status, Scan.updated_at).where(condition)).all()
    if not rows:
        return {}
    in_broker = scan_ids_in_broker(settings)  # read after the database: a task sent meanwhile is then seen
    if in_broker is None:
        return {}
    return {scan_id: (status, updated_at) for scan_id, status, updated_at in rows if scan_id not in in_broker}


def _requeue(app: FastAPI, scan_id: str, updated_at: datetime) -> bool:
    with app.state.sessions() as session:
        result = session.execute(update(Scan).where(Scan.id == scan_id, Scan.status == ScanStatus.running.value,
                                                    Scan.updated_at == updated_at)
                                 .values(status=ScanStatus.queued.value, stage=None, updated_at=utcnow()))
        session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]
