"""Webhook records: the tenant's signing secret, the outbox of ended scans' deliveries, and every delivery
attempt (GET /scans/{id}/webhooks).

The outbox: a scan created with ``notify.url`` carries its delivery id (``store.repository.add_scan``); its end,
written by whichever path ends it (the worker, a cancel while queued, the stale-scan sweep), is the outbox
record, in the same row and transaction. ``send_if_ended`` sends the task and then marks it sent; a process
that dies in between leaves the mark unset, and the API's sweep (``send_unsent``) sends it again with the same
delivery id. Delivery is therefore at least once; receivers drop repeats by ``X-Antidote-Delivery``."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime

from celery import Celery
from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from store.models import TERMINAL_STATUSES, Scan, Tenant, WebhookAttempt, utcnow
from store.queue import enqueue_webhook
from store.repository import new_id

SECRET_PREFIX = "whsec_"
FINAL_OUTCOMES = ("delivered", "failed", "refused")
log = logging.getLogger("antidote.webhooks")


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


def final_outcome(session: Session, scan_id: str, delivery_id: str) -> str | None:
    """The outcome that ended the delivery (delivered, failed, refused), or None while it is not over; a task
    sent twice by the outbox (at least once) stops here instead of posting again."""
    return session.scalar(select(WebhookAttempt.outcome).where(
        WebhookAttempt.scan_id == scan_id, WebhookAttempt.delivery_id == delivery_id,
        WebhookAttempt.outcome.in_(FINAL_OUTCOMES)).limit(1))


# --- the outbox ---------------------------------------------------------------------------------------------


def send_if_ended(celery: Celery, sessions: sessionmaker[Session], scan_id: str, queue: str) -> str | None:
    """Send the first try of an ended scan's webhook unless it was sent already, then mark it sent; returns the
    delivery id, or None when there is nothing to send (no notify.url, not ended, already sent, gone).

    Raises what the broker raises: the caller decides whether that may fail its request (it need not, the
    sweep sends what stays unsent)."""
    with sessions() as session:
        row = session.execute(select(Scan.status, Scan.webhook_delivery_id, Scan.webhook_queued_at)
                              .where(Scan.id == scan_id)).first()
    if row is None:
        return None
    status, delivery_id, queued_at = row
    if delivery_id is None or queued_at is not None or status not in TERMINAL_STATUSES:
        return None
    enqueue_webhook(celery, scan_id, delivery_id, 1, queue)
    with sessions() as session:
        session.execute(update(Scan).where(Scan.id == scan_id, Scan.webhook_queued_at.is_(None))
                        .values(webhook_queued_at=utcnow()))
        session.commit()
    return str(delivery_id)


def unsent(session: Session, ended_before: datetime, limit: int = 100) -> list[str]:
    """Ended scans whose webhook task was never sent, oldest end first (the partial index
    ``ix_scans_webhook_unsent`` holds only scans that want a webhook and have not sent it)."""
    return list(session.scalars(
        select(Scan.id).where(Scan.webhook_delivery_id.is_not(None), Scan.webhook_queued_at.is_(None),
                              Scan.status.in_([s.value for s in TERMINAL_STATUSES]), Scan.finished_at < ended_before)
        .order_by(Scan.finished_at).limit(limit)).all())


def send_unsent(celery: Celery, sessions: sessionmaker[Session], queue: str, ended_before: datetime) -> list[str]:
    """The sweep's half of the outbox: send every webhook still unsent that ended before ``ended_before`` (a
    grace long enough for the ender to have sent it itself); returns the scan ids sent."""
    with sessions() as session:
        ids = unsent(session, ended_before)
    sent = []
    for scan_id in ids:
        if send_if_ended(celery, sessions, scan_id, queue) is not None:
            sent.append(scan_id)
            log.warning("sent a webhook its scan's ender had not sent", extra={"scan_id": scan_id})
    return sent


def unsend_unfinished(session: Session) -> int:
    """Embedded restart (cli/serve.py empties the folder broker): every sent delivery that has not ended is
    marked unsent again, so that its scan's webhook is queued anew (same delivery id, tries counted from 1);
    returns how many."""
    over = exists().where(WebhookAttempt.scan_id == Scan.id, WebhookAttempt.delivery_id == Scan.webhook_delivery_id,
                          WebhookAttempt.outcome.in_(FINAL_OUTCOMES))
    result = session.execute(update(Scan).where(Scan.webhook_queued_at.is_not(None), ~over)
                             .values(webhook_queued_at=None).execution_options(synchronize_session=False))
    session.commit()
    return result.rowcount  # type: ignore[attr-defined, no-any-return]
