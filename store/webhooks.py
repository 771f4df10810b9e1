"""Webhook records: the tenant's signing secret and every delivery attempt (GET /scans/{id}/webhooks)."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import Tenant, WebhookAttempt, utcnow
from store.repository import new_id

SECRET_PREFIX = "whsec_"


def webhook_secret(session: Session, tenant_id: str) -> str:
    """The tenant's secret, made on first use so that every tenant can receive signed webhooks."""
    tenant = session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise LookupError(f"no tenant {tenant_id!r}")
    if tenant.webhook_secret is None:
        tenant.webhook_secret = SECRET_PREFIX + secrets.token_hex(24)
        session.commit()
    return tenant.webhook_secret


def secret_for_tenant_name(session: Session, name: str, rotate: bool) -> str | None:
    """The named tenant's secret (a new one with ``rotate``); None for an unknown tenant."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        return None
    if rotate:
        tenant.webhook_secret = SECRET_PREFIX + secrets.token_hex(24)
        session.commit()
        return tenant.webhook_secret
    return webhook_secret(session, tenant.id)


def record_attempt(session: Session, scan_id: str, delivery_id: str, attempt: int, url: str,
                   status_code: int | None, error: str | None, duration_ms: float, outcome: str) -> None:
    session.add(WebhookAttempt(id=new_id(), scan_id=scan_id, delivery_id=delivery_id, attempt=attempt, url=url,
                               attempted_at=utcnow(), status_code=status_code, error=error,
                               duration_ms=round(duration_ms, 1), outcome=outcome))
    session.commit()


def attempts_of(session: Session, scan_id: str) -> list[WebhookAttempt]:
    """Oldest first; the caller has checked that the scan belongs to the client's tenant."""
    return list(session.scalars(select(WebhookAttempt).where(WebhookAttempt.scan_id == scan_id)
                                .order_by(WebhookAttempt.attempted_at, WebhookAttempt.attempt)).all())
