"""The webhook Celery task: thin, over worker/webhook_delivery.py; retried with exponential backoff."""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from store import webhooks
from store.queue import DELIVER_WEBHOOK, enqueue_webhook
from worker.celery_app import app, settings
from worker.webhook_delivery import attempt_delivery, retry_delay_s

log = logging.getLogger("antidote.webhooks")


def send_after_run(celery: Celery, sessions: sessionmaker[Session], scan_id: str, queue: str) -> str | None:
    """After a delivery of a scan task: send its webhook if the scan has ended and it is not sent yet (the
    outbox, store/webhooks.py, makes a repeated delivery a no-op); returns the delivery id."""
    try:
        return webhooks.send_if_ended(celery, sessions, scan_id, queue)
    except Exception:  # the scan's result is recorded; the API's sweep sends what stays unsent
        log.exception("could not queue the webhook; the sweep will", extra={"scan_id": scan_id})
        return None


@app.task(name=DELIVER_WEBHOOK, bind=True, acks_late=True)
def deliver_webhook(self, scan_id: str, delivery_id: str, attempt: int = 1) -> str:  # type: ignore[no-untyped-def]
    from worker.tasks import _context

    result = attempt_delivery(_context().sessions, settings, scan_id, delivery_id, attempt)
    log.info("webhook attempt", extra={"scan_id": scan_id, "attempt": attempt, "outcome": result.outcome})
    if result.retry:
        # a new message with the next attempt number rather than self.retry: the number travels in the
        # arguments, so a redelivered message records the same attempt again instead of skipping one
        enqueue_webhook(self.app, scan_id, delivery_id, attempt + 1, settings.resolved_webhook_queue,
                        countdown=retry_delay_s(settings, attempt))
    return result.outcome
