"""The worker's Celery app: ``celery -A worker.celery_app worker -Q gpu --concurrency 1``."""

from __future__ import annotations

from celery.signals import worker_process_init

from store.logs import configure_logging
from store.queue import make_celery
from store.settings import get_settings

settings = get_settings()
app = make_celery(settings)
app.conf.imports = ("worker.tasks",)


@worker_process_init.connect
def _init_process(**_kwargs: object) -> None:
    configure_logging(settings.log_level, settings.log_json)
