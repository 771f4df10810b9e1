"""The Celery app both sides share: the API sends scan tasks by name, the worker registers and runs them."""

from __future__ import annotations

from celery import Celery

from store.settings import Settings

RUN_SCAN = "antidote.run_scan"


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
        "task_time_limit": settings.scan_time_limit_s + 120,  # the pipeline enforces the limit itself first
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout_s},
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
