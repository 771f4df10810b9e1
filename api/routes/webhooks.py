"""``GET /scans/{id}/webhooks``: every attempt of the scan's webhook, so a tenant can see why none arrived; and
the API's own sends of the webhook outbox (a scan canceled while queued, the sweep of unsent ones)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.deps import current_tenant, get_session
from api.errors import ApiError, ErrorOut
from store import repository, webhooks
from store.models import Tenant, as_utc, utcnow
from store.queue import take_broker_lock
from store.settings import Settings
from store.webhook_guard import TargetRefused, check_host

log = logging.getLogger("antidote.api")
SWEEP_LOCK_TTL_S = 10

router = APIRouter(tags=["webhooks"],
                   responses={404: {"model": ErrorOut, "description": "no such scan for this tenant"}})


class WebhookAttemptOut(BaseModel):
    delivery_id: str
    attempt: int
    url: str
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float
    outcome: str  # delivered, retrying, failed, refused


class WebhookAttemptsOut(BaseModel):
    scan_id: str
    attempts: list[WebhookAttemptOut]


@router.get("/scans/{scan_id}/webhooks", response_model=WebhookAttemptsOut)
def read_webhook_attempts(scan_id: str, tenant: Tenant = Depends(current_tenant),
                          session: Session = Depends(get_session)) -> WebhookAttemptsOut:
    """The scan's webhook attempts, oldest first (empty before the scan ends or without notify.url)."""
    if repository.get_scan(session, tenant.id, scan_id) is None:
        raise ApiError(404, f"no scan {scan_id!r}")
    rows = webhooks.attempts_of(session, scan_id)
    return WebhookAttemptsOut(scan_id=scan_id, attempts=[WebhookAttemptOut(
        delivery_id=r.delivery_id, attempt=r.attempt, url=r.url, attempted_at=as_utc(r.attempted_at),
        status_code=r.status_code, error=r.error, duration_ms=r.duration_ms, outcome=r.outcome) for r in rows])


def check_notify_host(url: str, settings: Settings) -> None:
    """At submission: a notify.url whose host the operator does not allow is a 422 (addresses are checked by
    the worker, after resolution, at each try)."""
    from urllib.parse import urlsplit

    try:
        check_host(urlsplit(url).hostname or "", settings.webhook_host_patterns)
    except TargetRefused as exc:
        raise ApiError(422, f"spec.notify.url: {exc}", field="spec.notify.url") from exc


def send_ended_webhook(app: FastAPI, scan_id: str) -> None:
    """The webhook of a scan the API itself ended (canceled while queued: no worker will see it end). A broker
    that is down does not fail the request: the scan stays in the outbox and the sweep sends it."""
    try:
        webhooks.send_if_ended(app.state.celery, app.state.sessions, scan_id, app.state.settings.resolved_webhook_queue)
    except Exception:
        log.exception("could not queue the webhook; the sweep will", extra={"scan_id": scan_id})


def send_unsent_webhooks(app: FastAPI) -> list[str]:
    """The sweep: webhooks of scans that ended ANTIDOTE_WEBHOOK_SWEEP_GRACE_S ago or more and were never sent
    (the process that ended the scan died first). One API replica at a time (a lock in the Redis broker)."""
    settings: Settings = app.state.settings
    ended_before = utcnow() - timedelta(seconds=settings.webhook_sweep_grace_s)
    with app.state.sessions() as session:
        if not webhooks.unsent(session, ended_before, limit=1):
            return []
    if not take_broker_lock(settings, "webhooks", SWEEP_LOCK_TTL_S):
        return []
    return webhooks.send_unsent(app.state.celery, app.state.sessions, settings.resolved_webhook_queue, ended_before)
