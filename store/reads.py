"""The API's hot reads (a key's tenant, one scan's status, a page of a tenant's scans) as awaitables.

On PostgreSQL they run on psycopg's async pool straight from the event loop: no thread hop, no ORM session, no
ping per checkout, only the columns an answer needs (``bench/api_bench.py`` measures the path against a bare
anchor). On SQLite, the embedded default, the same statements run on the sync engine in a worker thread. The
statements are SQLAlchemy Core, compiled once, so the table definitions stay in ``store/models.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import Engine, Select, and_, bindparam, make_url, or_, select
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

from store.models import ApiKey, Scan, Tenant, as_utc
from store.repository import decode_cursor, encode_cursor, is_scan_id


@dataclass(frozen=True, slots=True)
class ScanSummary:
    """What ``GET /scans`` (and the scans page) answer about a scan: no spec, inputs or report (those can be
    large JSON); the verdict comes from its own columns."""

    id: str
    status: str
    mode: str
    stage: str | None
    progress: float
    created_at: datetime
    updated_at: datetime
    error_code: str | None
    error_message: str | None
    verdict_label: str | None = None  # the columns finish_scan writes from report["verdict"]
    verdict_score: float | None = None


@dataclass(frozen=True, slots=True)
class SummaryPage:
    items: list[ScanSummary]
    next_cursor: str | None


SUMMARY_COLUMNS = (Scan.id, Scan.status, Scan.mode, Scan.stage, Scan.progress, Scan.created_at, Scan.updated_at,
                   Scan.error_code, Scan.error_message, Scan.verdict_label, Scan.verdict_score)


def tenant_statement() -> Select[Any]:
    return (select(Tenant.id, Tenant.name).join(ApiKey, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)))


def scan_statement() -> Select[Any]:
    return select(*SUMMARY_COLUMNS).where(Scan.id == bindparam("scan_id"), Scan.tenant_id == bindparam("tenant_id"))


@cache
def page_statement(with_status: bool, with_cursor: bool) -> Select[Any]:
    """Newest first, keyset-paginated on (created_at, id), which ``ix_scans_tenant_created`` serves."""
    query = select(*SUMMARY_COLUMNS).where(Scan.tenant_id == bindparam("tenant_id"))
    if with_status:
        query = query.where(Scan.status == bindparam("status"))
    if with_cursor:
        query = query.where(or_(Scan.created_at < bindparam("after_created"),
                                and_(Scan.created_at == bindparam("after_created"), Scan.id < bindparam("after_id"))))
    return query.order_by(Scan.created_at.desc(), Scan.id.desc()).limit(bindparam("n"))


def page_params(tenant_id: str, status: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
    """Bind values of ``page_statement``; raises ValueError for a cursor this service did not make."""
    params: dict[str, Any] = {"tenant_id": tenant_id, "n": limit + 1}
    if status:
        params["status"] = status
    if cursor:
        params["after_created"], params["after_id"] = decode_cursor(cursor)
    return params


def summary(row: Any) -> ScanSummary:
    return ScanSummary(*row[:5], as_utc(row[5]), as_utc(row[6]), *row[7:])


def cut_page(rows: list[Any], limit: int) -> SummaryPage:
    """``rows`` holds up to ``limit + 1`` rows: one more than a page says whether there is a next one."""
    items = [summary(r) for r in rows[:limit]]
    last = items[-1] if len(rows) > limit else None
    return SummaryPage(items, encode_cursor(last.created_at, last.id) if last else None)


class Reads:
    """The read side the API awaits; one per API process, opened and closed by the app's lifespan."""

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _rows(self, statement: Select[Any], params: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    async def tenant_for_key_hash(self, key_hash: str) -> Tenant | None:
        """The tenant of an unrevoked key, detached from any session (the key cache keeps it)."""
        rows = await self._rows(_TENANT, {"key_hash": key_hash})
        return Tenant(id=rows[0][0], name=rows[0][1]) if rows else None

    async def scan(self, tenant_id: str, scan_id: str) -> ScanSummary | None:
        """The tenant's scan, or ``None`` (also for an id of no scan's shape, never sent to the database)."""
        if not is_scan_id(scan_id):
            return None
        rows = await self._rows(_SCAN, {"scan_id": scan_id, "tenant_id": tenant_id})
        return summary(rows[0]) if rows else None

    async def scans(self, tenant_id: str, status: str | None, limit: int, cursor: str | None) -> SummaryPage:
        """The tenant's scans, newest first; raises ValueError for a cursor this service did not make."""
        params = page_params(tenant_id, status, limit, cursor)
        return cut_page(await self._rows(page_statement(bool(status), bool(cursor)), params), limit)


class PostgresReads(Reads):
    """psycopg's async pool; a restarted server's dead connections are dropped and the query tried once more."""

    def __init__(self, url: str, pool_size: int, timeout_s: float) -> None:
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        # autocommit: a lone SELECT needs no BEGIN/COMMIT, which would be two more round trips per GET
        self.pool = AsyncConnectionPool(conninfo, min_size=min(4, pool_size), max_size=pool_size,
                                        timeout=timeout_s, kwargs={"autocommit": True}, open=False)
        self._sql: dict[int, str] = {}

    def _compiled(self, statement: Select[Any]) -> str:
        sql = self._sql.get(id(statement))
        if sql is None:  # the statements are module-level or cached, so id() is stable
            sql = self._sql[id(statement)] = str(statement.compile(dialect=pg_psycopg.dialect()))
        return sql

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def _rows(self, statement: Select[Any], params: dict[str, Any]) -> list[Any]:
        if self.pool.closed:  # an app used without its lifespan (a bare TestClient)
            await self.pool.open()
        sql = self._compiled(statement)
        try:
            return await self._fetch(sql, params)
        except psycopg.OperationalError as exc:
            if not _dead_connection(exc):
                raise
        # after a database restart every idle connection is dead: drop them all, then one retry
        await self.pool.check()
        return await self._fetch(sql, params)

    async def _fetch(self, sql: str, params: dict[str, Any]) -> list[Any]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()


def _dead_connection(exc: psycopg.OperationalError) -> bool:
    """A query failed on a connection the server had closed (not a pool timeout, not a refused connect)."""
    return not isinstance(exc, PoolTimeout)


class ThreadedReads(Reads):
    """The same statements on the sync engine, in a worker thread (SQLite has no async driver here)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _rows_sync(self, statement: Select[Any], params: dict[str, Any]) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(statement, params).all())

    async def _rows(self, statement: Select[Any], params: dict[str, Any]) -> list[Any]:
        return await asyncio.to_thread(self._rows_sync, statement, params)


_TENANT = tenant_statement()
_SCAN = scan_statement()


def open_reads(url: str, engine: Engine, pool_size: int, timeout_s: float) -> Reads:
    """PostgreSQL gets its async pool; anything else reads through ``engine``."""
    if make_url(url).get_backend_name() == "postgresql":
        return PostgresReads(url, pool_size, timeout_s)
    return ThreadedReads(engine)
