"""The Celery app both sides share: the API sends scan tasks by name, the worker registers and runs them."""

from __future__ import annotations

import re

from celery import Celery

from store.settings import Settings

RUN_SCAN = "antidote.run_scan"
DELIVER_WEBHOOK = "antidote.deliver_webhook"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured broker (Redis in production, a folder for the embedded default)."""
    app = Celery("antidote", broker=settings.resolved_broker_url)
    conf: dict = {
        "task_default_queue": settings.queue,
        "task_routes": {RUN_SCAN: {"queue": settings.queue}},
        "task_ignore_result": True,
        # one scan per GPU: a worker holds one unacknowledged task and takes the next only when it is done
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,  # our JSON log lines go to stderr as they are
        "broker_connection_retry_on_startup": True,
        # a worker outlives a Redis restart or outage of any length: it reconnects (with backoff) for ever
        # rather than exiting after 100 tries; the scan it is running carries on and records its result in the
        # database, the source of truth (a task Redis forgot is sent again by api/recovery.py)
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_time_limit": settings.scan_time_limit_s + 120,  # the pipeline enforces the limit itself first
        # bounded socket waits: a Redis that is unreachable (not just refusing) must not hang a POST /scans
        # kombu >= 5.7 sweeps for unacknowledged tasks past their visibility timeout only every interval x
        # throttle seconds (10 x 10 by default): a SIGKILLed worker's scan would wait ~100 s more to be
        # delivered again; throttle 1 makes it one sweep every 10 s (older kombu ignores both keys)
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout_s,
                                     "socket_timeout": 10, "socket_connect_timeout": 5,
                                     "unacked_restore_interval": 10, "unacked_restore_throttle": 1},
    }
    if settings.embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
        }
        conf["worker_enable_remote_control"] = False
    app.conf.update(conf)
    return app


def enqueue_scan(app: Celery, scan_id: str, queue: str) -> None:
    app.send_task(RUN_SCAN, args=[scan_id], queue=queue)


def enqueue_webhook(app: Celery, scan_id: str, delivery_id: str, attempt: int, queue: str,
                    countdown: float | None = None) -> None:
    """Send try ``attempt`` of the scan's webhook delivery (worker/webhooks.py runs it)."""
    app.send_task(DELIVER_WEBHOOK, args=[scan_id, delivery_id, attempt], queue=queue, countdown=countdown)


_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# kombu's Redis transport: priority p > 0 goes to "<queue>\x06\x16<p>", unacknowledged deliveries to a hash
_PRIORITY_SEP, _PRIORITY_STEPS, _UNACKED_KEY = "\x06\x16", (3, 6, 9), "unacked"


def scan_ids_in_broker(settings: Settings) -> set[str] | None:
    """Scan ids whose task waits in the Redis queue or is delivered but unacknowledged; None for a broker that
    is not Redis (the embedded folder broker keeps its messages on disk).

    A Redis without persistence forgets every task when it restarts, while the database still says
    ``queued``: comparing the two finds the scans nobody will ever run (``api.recovery``). A task's scan id
    is in its headers in clear (``argsrepr``), so a pattern match is enough and needs no kombu internals."""
    url = settings.resolved_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        queues = [settings.queue] + [f"{settings.queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS]
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            pipe.lrange(queue, 0, -1)
        pipe.hvals(_UNACKED_KEY)
        found: set[str] = set()
        for chunk in pipe.execute():
            for raw in chunk:
                found.update(m.decode() for m in _UUID.findall(raw))
        return found
    finally:
        client.close()


def take_broker_lock(settings: Settings, name: str, ttl_s: int) -> bool:
    """True for the one caller (across API replicas) that sets ``name`` in the Redis broker first; the key
    expires after ``ttl_s``, so a crashed holder blocks nobody for longer. Other brokers: always True (one
    process, the embedded server)."""
    url = settings.resolved_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return True
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        return bool(client.set(f"antidote:lock:{name}", "1", nx=True, ex=ttl_s))
    finally:
        client.close()
