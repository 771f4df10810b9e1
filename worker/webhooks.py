"""The webhook Celery task: thin, over worker/webhook_delivery.py; retried with exponential backoff."""

from __future__ import annotations

import logging

from celery import Celery

from store.models import TERMINAL_STATUSES, Scan
from store.repository import new_id
from worker.celery_app import app, settings
from worker.webhook_delivery import attempt_delivery, retry_delay_s

DELIVER_WEBHOOK = "antidote.deliver_webhook"
log = logging.getLogger("antidote.webhooks")


def enqueue_if_wanted(celery: Celery, sessions, scan_id: str, queue: str) -> str | None:  # type: ignore[no-untyped-def]
    """Send the delivery task when the ended scan's spec has notify.url; returns the delivery id."""
    with sessions() as session:
        scan = session.get(Scan, scan_id)
        if scan is None or scan.status not in TERMINAL_STATUSES or not (scan.spec.get("notify") or {}).get("url"):
            return None
    delivery_id = new_id()
    try:
        celery.send_task(DELIVER_WEBHOOK, args=[scan_id, delivery_id, 1], queue=queue)
    except Exception:  # the scan's result is recorded; a broker hiccup must not turn its task into an error
        log.exception("could not queue the webhook", extra={"scan_id": scan_id})
        return None
    return delivery_id


@app.task(name=DELIVER_WEBHOOK, bind=True, acks_late=True)
def deliver_webhook(self, scan_id: str, delivery_id: str, attempt: int = 1) -> str:  # type: ignore[no-untyped-def]
    from worker.tasks import _context

    result = attempt_delivery(_context().sessions, settings, scan_id, delivery_id, attempt)
    log.info("webhook attempt", extra={"scan_id": scan_id, "attempt": attempt, "outcome": result.outcome})
    if result.retry:
        # a new message with the next attempt number rather than self.retry: the number travels in the
        # arguments, so a redelivered message records the same attempt again instead of skipping one
        self.apply_async(args=[scan_id, delivery_id, attempt + 1], countdown=retry_delay_s(settings, attempt),
                         queue=settings.resolved_webhook_queue)
    return result.outcome
