"""Liveness and readiness probes (no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The database, the object store and the broker all answer; 503 names the ones that do not."""
    state = request.app.state
    checks: dict[str, str] = {}

    def db() -> None:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))

    def broker() -> None:
        with state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    for name, fn in (("database", db), ("storage", state.store.ping), ("broker", broker)):
        try:
            await run_in_threadpool(fn)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]
    ready = all(v == "ok" for v in checks.values())
    headers = None if ready else {"Retry-After": str(state.settings.dependency_retry_after_s)}
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503, headers=headers)
