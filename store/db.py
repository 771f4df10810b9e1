"""Engines and sessions for PostgreSQL (production) and SQLite (the embedded default)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, connect_timeout_s: int = 5) -> Engine:
    """An engine with the settings each backend needs for a busy API and a worker side by side.

    PostgreSQL: ``pool_pre_ping`` replaces the connections a restart or failover cut, so the API and the
    worker recover by themselves; ``connect_timeout_s`` bounds each attempt to reach a server that does not
    answer at all (without it, a request waits for the kernel's TCP timeout, minutes)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         connect_args={"connect_timeout": connect_timeout_s})


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def upgrade_database(url: str) -> None:
    """Apply every Alembic migration to the database at ``url``."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    import migrations

    folder = Path(migrations.__file__).parent
    cfg = Config()
    cfg.set_main_option("script_location", str(folder))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg
