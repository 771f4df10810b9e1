"""The FastAPI application factory: settings -> database, object store, queue, routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.body_guard import BodyGuard
from api.deps import KeyCache
from api.errors import (
    DATABASE_DOWN_ERRORS,
    ERROR_RESPONSES,
    ApiError,
    ErrorShield,
    api_error_handler,
    database_unavailable_handler,
    http_error_handler,
    validation_error_handler,
)
from api.metrics import ApiMetrics
from api.recovery import redeliver_lost_scans
from api.routes import health, pages, scans, webhooks
from api.upload_budget import UploadBudget
from store import repository
from store.db import make_engine, make_session_factory
from store.logs import configure_logging
from store.objects import open_store
from store.queue import make_celery
from store.reads import open_reads
from store.settings import Settings, get_settings


class RequestTimer:
    """Request latency by route template, as plain ASGI middleware (``BaseHTTPMiddleware`` costs far more).

    The labelled histograms are kept per (method, route, status): ``labels()`` costs as much as ``observe()``."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram
        self._children: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            key = (scope["method"], getattr(route, "path", "unmatched"), status)
            child = self._children.get(key)
            if child is None:
                if len(self._children) > 10_000:  # methods are client-chosen: keep the map bounded
                    self._children.clear()
                child = self._children[key] = self.histogram.labels(key[0], key[1], str(status))
            child.observe(time.perf_counter() - t0)


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
        try:
            await run_in_threadpool(webhooks.send_unsent_webhooks, app)
        except Exception:
            log.exception("webhook outbox sweep failed")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    interval = app.state.settings.stale_sweep_interval_s
    await app.state.reads.open()
    # torch, numpy and the rest make ~270k long-lived objects: a full collection walks them all (0.1-0.4 s,
    # every request waiting meanwhile, the p99 of GET /scans/{id}); frozen, collections skip them
    gc.collect()
    gc.freeze()
    task = asyncio.create_task(_sweep_forever(app, interval)) if interval > 0 else None
    try:
        yield
    finally:
        await app.state.reads.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def app_from_environment() -> FastAPI:
    """The factory ``antidote serve --workers N`` hands uvicorn: each worker process configures its logging and
    builds its app (and its own database pools) from the ``ANTIDOTE_*`` environment."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Antidote", version="0.1.0", lifespan=_lifespan, responses=ERROR_RESPONSES,
                  description="Scans and repairs backdoored image classifiers. See docs/api.md.")
    engine = make_engine(settings.resolved_database_url, settings.db_connect_timeout_s)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_session_factory(engine)
    app.state.reads = open_reads(settings.resolved_database_url, engine, settings.read_pool_size,
                                 settings.read_pool_timeout_s)
    app.state.store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url, settings.s3_region)
    app.state.celery = make_celery(settings)
    app.state.metrics = ApiMetrics(app.state.sessions)
    app.state.key_cache = KeyCache(settings.key_cache_s)
    app.state.upload_budget = UploadBudget(settings.max_concurrent_uploads, settings.max_spool_bytes,
                                           settings.retry_after_s)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    for error in DATABASE_DOWN_ERRORS:
        app.add_exception_handler(error, database_unavailable_handler)
    # routes match in order: the polled GET /scans/{id} first, past as few patterns as possible
    app.include_router(scans.router)
    app.include_router(health.router)
    app.include_router(webhooks.router)
    app.include_router(pages.router)

    # outermost last: BodyGuard sees every answer (the JSON 500 too) before its first byte goes out
    app.add_middleware(ErrorShield)
    app.add_middleware(RequestTimer, histogram=app.state.metrics.request_seconds)
    app.add_middleware(BodyGuard, drain_max_bytes=settings.drain_max_bytes,
                       drain_timeout_s=settings.drain_timeout_s, read_timeout_s=settings.body_read_timeout_s)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if settings.metrics_token is not None and not bearer_matches(request, settings.metrics_token):
            raise ApiError(401, "metrics need 'Authorization: Bearer <ANTIDOTE_METRICS_TOKEN>'",
                           field="Authorization", headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def bearer_matches(request: Request, token: str) -> bool:
    """True when the request's ``Authorization: Bearer`` carries ``token``; constant-time, so a scraper's
    guesses learn nothing from the answer's timing."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
