"""``GET /scans/{id}/webhooks``: every attempt of the scan's webhook, so a tenant can see why none arrived."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.deps import current_tenant, get_session
from api.errors import ApiError, ErrorOut
from store import repository, webhooks
from store.models import Tenant, as_utc
from store.settings import Settings
from store.webhook_guard import TargetRefused, check_host

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
