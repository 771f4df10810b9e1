"""``store/reads.py``, the GET paths' queries, on real PostgreSQL (psycopg's async pool) and on SQLite (the sync
engine in a thread): tenant scoping, keyset pages with ties, revoked keys, and recovery from dropped connections."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, make_url, select, update

from bench.services import create_database, drop_database
from store import repository
from store.db import make_engine, make_session_factory, upgrade_database
from store.models import ApiKey, Scan, Tenant
from store.reads import PostgresReads, Reads, ThreadedReads, open_reads


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    url = create_database("antidote_reads") if request.param == "postgresql" else f"sqlite:///{tmp_path}/r.sqlite"
    upgrade_database(url)
    engine = make_engine(url)
    try:
        yield url, engine
    finally:
        engine.dispose()
        if request.param == "postgresql":
            drop_database(url)


def run(url: str, engine: Engine, body: Callable[[Reads], Awaitable[Any]]) -> Any:
    """Open the reads as the app's lifespan does, run ``body`` on one event loop, close them."""
    async def main() -> Any:
        reads = open_reads(url, engine, pool_size=4, timeout_s=5)
        await reads.open()
        try:
            return await body(reads)
        finally:
            await reads.close()

    return asyncio.run(main())


def seed(engine: Engine) -> dict[str, Any]:
    """Two tenants; five scans for the first, two of them created at the same instant (a tie on the cursor)."""
    sessions = make_session_factory(engine)
    with sessions() as session:
        key_a, key_b = repository.create_api_key(session, "a"), repository.create_api_key(session, "b")
        tenant_a = repository.tenant_for_key(session, key_a)
        tenant_b = repository.tenant_for_key(session, key_b)
        assert tenant_a and tenant_b
        ids = [repository.add_scan(session, repository.new_id(), tenant_a.id, "scan", {}, {}).id for _ in range(5)]
        tie = datetime(2030, 1, 1, tzinfo=UTC)
        session.execute(update(Scan).where(Scan.id.in_(ids[3:])).values(created_at=tie))
        session.execute(update(Scan).where(Scan.id == ids[0]).values(status="failed", error_code="worker_lost",
                                                                     error_message="lost"))
        session.commit()
        order = list(session.scalars(select(Scan.id).where(Scan.tenant_id == tenant_a.id)
                                     .order_by(Scan.created_at.desc(), Scan.id.desc())))
        other = repository.add_scan(session, repository.new_id(), tenant_b.id, "scan", {}, {}).id
    return {"a": tenant_a, "b": tenant_b, "key_a": key_a, "key_b": key_b, "ids": ids, "order": order,
            "other": other}


def test_one_scan_is_scoped_to_its_tenant(database: tuple[str, Engine]) -> None:
    url, engine = database
    s = seed(engine)

    async def body(reads: Reads) -> None:
        own = await reads.scan(s["a"].id, s["ids"][0])
        assert own is not None and own.id == s["ids"][0] and own.status == "failed" and own.mode == "scan"
        assert own.error_code == "worker_lost" and own.error_message == "lost" and own.progress == 0
        assert own.created_at.tzinfo is not None and own.updated_at.tzinfo is not None
        assert await reads.scan(s["b"].id, s["ids"][0]) is None  # another tenant's scan does not exist for b
        assert await reads.scan(s["a"].id, s["other"]) is None
        assert await reads.scan(s["a"].id, "no-such-id") is None

    run(url, engine, body)


def test_pages_walk_every_scan_once_newest_first_across_ties(database: tuple[str, Engine]) -> None:
    url, engine = database
    s = seed(engine)

    async def body(reads: Reads) -> None:
        seen, cursor = [], None
        while True:
            page = await reads.scans(s["a"].id, None, 2, cursor)
            assert len(page.items) <= 2
            seen += [item.id for item in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == s["order"]
        failed = await reads.scans(s["a"].id, "failed", 10, None)
        assert [i.id for i in failed.items] == [s["ids"][0]] and failed.next_cursor is None
        assert [i.id for i in (await reads.scans(s["b"].id, None, 10, None)).items] == [s["other"]]
        with pytest.raises(ValueError):
            await reads.scans(s["a"].id, None, 2, "not-a-cursor")

    run(url, engine, body)


def test_a_revoked_key_has_no_tenant(database: tuple[str, Engine]) -> None:
    url, engine = database
    s = seed(engine)
    digest = hashlib.sha256(s["key_a"].encode()).hexdigest()

    async def lookup(reads: Reads) -> Tenant | None:
        return await reads.tenant_for_key_hash(digest)

    tenant = run(url, engine, lookup)
    assert tenant is not None and (tenant.id, tenant.name) == (s["a"].id, "a")
    with make_session_factory(engine)() as session:
        session.execute(update(ApiKey).where(ApiKey.key_hash == digest).values(revoked_at=datetime.now(UTC)))
        session.commit()
    assert run(url, engine, lookup) is None


def test_the_backend_decides_the_reader(database: tuple[str, Engine]) -> None:
    url, engine = database
    reads = open_reads(url, engine, pool_size=2, timeout_s=1)
    assert isinstance(reads, PostgresReads if url.startswith("postgresql") else ThreadedReads)


def test_postgres_reads_survive_their_connections_being_killed(database: tuple[str, Engine]) -> None:
    """What a database restart does to an idle pool: every connection is closed by the server."""
    url, engine = database
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    s = seed(engine)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")

    async def body(reads: Reads) -> int:
        assert isinstance(reads, PostgresReads)
        await reads.pool.wait(timeout=10)
        assert await reads.scan(s["a"].id, s["ids"][1]) is not None
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
            cur = await admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            killed = (await cur.fetchone())[0]  # type: ignore[index]
        for _ in range(10):  # more reads than the pool has connections: none may fail
            got = await reads.scan(s["a"].id, s["ids"][1])
            assert got is not None and got.id == s["ids"][1]
        return int(killed)

    assert run(url, engine, body) >= 1


class TcpGate:
    """A loopback TCP relay to PostgreSQL that can go down (dropping every connection) and come back on the
    same port: a database outage without touching the shared server."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_postgres_reads_fail_fast_while_the_database_is_away_and_recover_by_themselves(
        database: tuple[str, Engine]) -> None:
    url, engine = database
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    s = seed(engine)
    parsed = make_url(url)

    async def body() -> None:
        gate = TcpGate(parsed.port or 5432)
        await gate.up()
        reads = PostgresReads(parsed.set(port=gate.port).render_as_string(hide_password=False), 2, timeout_s=1)
        await reads.open()
        try:
            assert await reads.scan(s["a"].id, s["ids"][2]) is not None
            await gate.down()
            t0 = time.monotonic()
            with pytest.raises(psycopg.OperationalError):  # the API's handler answers these with a 503
                await reads.scan(s["a"].id, s["ids"][2])
            assert time.monotonic() - t0 < 5
            await gate.up()
            deadline = time.monotonic() + 20
            while True:  # the pool reconnects in the background; no restart of anything
                try:
                    if await reads.scan(s["a"].id, s["ids"][2]) is not None:
                        break
                except psycopg.OperationalError:
                    assert time.monotonic() < deadline, "the pool did not reconnect"
                    await asyncio.sleep(0.2)
            for _ in range(10):
                assert await reads.scan(s["a"].id, s["ids"][2]) is not None
        finally:
            await reads.close()
            await gate.down()

    asyncio.run(body())
