"""Alembic on a real, empty PostgreSQL database: the migrations apply, undo, and agree with the models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from bench.services import create_database, drop_database
from store.db import alembic_config, make_engine, upgrade_database
from store.models import Base

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_database() -> Iterator[str]:
    url = create_database("antidote_mig")
    yield url
    drop_database(url)


def _diff(url: str) -> list:
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    return diff


def test_migrations_build_exactly_the_models_on_postgres(empty_database: str) -> None:
    upgrade_database(empty_database)
    assert _diff(empty_database) == []
    engine = make_engine(empty_database)
    assert set(inspect(engine).get_table_names()) >= {"tenants", "api_keys", "scans", "alembic_version"}
    engine.dispose()


def test_migrations_downgrade_and_upgrade_again(empty_database: str) -> None:
    upgrade_database(empty_database)
    command.downgrade(alembic_config(empty_database), "base")
    engine = make_engine(empty_database)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()
    upgrade_database(empty_database)
    assert _diff(empty_database) == []


def test_migrations_build_exactly_the_models_on_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    upgrade_database(url)
    assert _diff(url) == []
