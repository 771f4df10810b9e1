"""The FastAPI application factory: settings -> database, object store, queue, routes."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.errors import ApiError, api_error_handler
from api.metrics import ApiMetrics
from api.routes import health, scans
from store.db import make_engine, make_session_factory
from store.objects import open_store
from store.queue import make_celery
from store.settings import Settings, get_settings


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
    app.add_exception_handler(ApiError, api_error_handler)
    app.include_router(health.router)
    app.include_router(scans.router)

    @app.middleware("http")
    async def _time_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        app.state.metrics.request_seconds.labels(
            request.method, getattr(route, "path", "unmatched"), str(response.status_code)
        ).observe(time.perf_counter() - t0)
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
