"""The FastAPI application factory: settings -> database, object store, queue, routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import KeyCache
from api.errors import DATABASE_DOWN_ERRORS, ApiError, api_error_handler, database_unavailable_handler
from api.metrics import ApiMetrics
from api.recovery import redeliver_lost_scans
from api.routes import health, scans
from store import repository
from store.db import make_engine, make_session_factory
from store.objects import open_store
from store.queue import make_celery
from store.settings import Settings, get_settings


class RequestTimer:
    """Request latency by route template, as plain ASGI middleware (``BaseHTTPMiddleware`` costs far more)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            self.histogram.labels(scope["method"], getattr(route, "path", "unmatched"), str(status["code"])
                                  ).observe(time.perf_counter() - t0)


log = logging.getLogger("antidote.api")


def sweep_stale_scans(app: FastAPI) -> list[str]:
    """Fail the running scans nobody will end any more (``repository.fail_stale_running``); idempotent, so
    several API replicas may all run it."""
    settings: Settings = app.state.settings
    with app.state.sessions() as session:
        failed = repository.fail_stale_running(session, settings.stale_after_s, settings.scan_time_limit_s)
    for scan_id in failed:
        log.warning("failed a stale running scan", extra={"scan_id": scan_id})
    return failed


async def _sweep_forever(app: FastAPI, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await run_in_threadpool(sweep_stale_scans, app)
        except Exception:  # a database hiccup must not end the loop
            log.exception("stale-scan sweep failed")
        try:
            await run_in_threadpool(redeliver_lost_scans, app)
        except Exception:  # nor a broker that is down
            log.exception("lost-task recovery failed")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    interval = app.state.settings.stale_sweep_interval_s
    task = asyncio.create_task(_sweep_forever(app, interval)) if interval > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Antidote", version="0.1.0", lifespan=_lifespan,
                  description="Scans and repairs backdoored image classifiers. See CONTRACT.md.")
    engine = make_engine(settings.resolved_database_url, settings.db_connect_timeout_s)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_session_factory(engine)
    app.state.store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url, settings.s3_region)
    app.state.celery = make_celery(settings)
    app.state.metrics = ApiMetrics(app.state.sessions)
    app.state.key_cache = KeyCache(settings.key_cache_s)
    app.add_exception_handler(ApiError, api_error_handler)
    for error in DATABASE_DOWN_ERRORS:
        app.add_exception_handler(error, database_unavailable_handler)
    app.include_router(health.router)
    app.include_router(scans.router)

    app.add_middleware(RequestTimer, histogram=app.state.metrics.request_seconds)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
