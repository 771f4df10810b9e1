"""The FastAPI application factory: settings -> database, object store, queue, routes."""

from __future__ import annotations

import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import KeyCache
from api.errors import ApiError, api_error_handler
from api.metrics import ApiMetrics
from api.routes import health, scans
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Antidote", version="0.1.0",
                  description="Scans and repairs backdoored image classifiers. See CONTRACT.md.")
    engine = make_engine(settings.resolved_database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_session_factory(engine)
    app.state.store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url, settings.s3_region)
    app.state.celery = make_celery(settings)
    app.state.metrics = ApiMetrics(app.state.sessions)
    app.state.key_cache = KeyCache(settings.key_cache_s)
    app.add_exception_handler(ApiError, api_error_handler)
    app.include_router(health.router)
    app.include_router(scans.router)

    app.add_middleware(RequestTimer, histogram=app.state.metrics.request_seconds)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
