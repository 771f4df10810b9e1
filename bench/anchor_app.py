"""The bare anchor that ``bench/api_bench.py`` measures the API against: the least a ``GET /scans/{id}`` can do.

A minimal FastAPI app as a plain developer would write it: an async psycopg pool, one indexed row, a header
check against one known token, a dict back. Run it like the API (same uvicorn, same worker processes):

    ANCHOR_DATABASE_URL=postgresql://... ANCHOR_TOKEN=t uvicorn bench.anchor_app:app --workers 2
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI, Header, HTTPException
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS anchor_scans (
    id text PRIMARY KEY, tenant_id text NOT NULL, status text NOT NULL, mode text NOT NULL, stage text,
    progress double precision NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
    error_code text, error_message text
)"""
READ_SQL = ("SELECT id, status, mode, stage, progress, created_at, updated_at, error_code, error_message "
            "FROM anchor_scans WHERE id = %s AND tenant_id = %s")
TENANT = "anchor-tenant"


def seed(dsn: str, scan_id: str) -> None:
    """Create the table and its one row (called once by the benchmark, before the servers start)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE_SQL)
        conn.execute("INSERT INTO anchor_scans VALUES (%s, %s, 'queued', 'scan', NULL, 0, now(), now(), NULL, NULL) "
                     "ON CONFLICT (id) DO NOTHING", (scan_id, TENANT))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # the same pool bound per process as the API's engine (store/db.py)
    # autocommit as the API's reads have it: a lone SELECT with no BEGIN/COMMIT round trips
    autocommit = os.environ.get("ANCHOR_AUTOCOMMIT", "1") == "1"
    async with AsyncConnectionPool(os.environ["ANCHOR_DATABASE_URL"], min_size=4, max_size=10,
                                   kwargs={"row_factory": dict_row, "autocommit": autocommit}) as pool:
        app.state.pool = pool
        yield


app = FastAPI(lifespan=lifespan)
EXPECTED = f"Bearer {os.environ.get('ANCHOR_TOKEN', '')}"


@app.get("/scans/{scan_id}")
async def read_scan(scan_id: str, authorization: str = Header("")) -> dict[str, Any]:
    if authorization != EXPECTED:
        raise HTTPException(401, "invalid API key")
    async with app.state.pool.connection() as conn:
        cur = await conn.execute(READ_SQL, (scan_id, TENANT))
        row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, "no such scan")
    code, message = row.pop("error_code"), row.pop("error_message")
    return {**row, "error": {"code": code, "message": message or ""} if code else None}
