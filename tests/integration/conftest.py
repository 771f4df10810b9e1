"""The production configuration on real services: PostgreSQL, Redis and an S3 server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from store import repository
from store.db import make_engine, make_session_factory, upgrade_database
from store.settings import Settings


@pytest.fixture(scope="session")
def prod_settings(postgres_url: str, redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
                  ) -> Settings:
    upgrade_database(postgres_url)
    return Settings(data_dir=tmp_path_factory.mktemp("prod"), database_url=postgres_url, broker_url=redis_url,
                    storage_url=f"s3://antidote-test-{uuid.uuid4().hex[:8]}/scans-root", s3_endpoint_url=s3_endpoint,
                    broker_visibility_timeout_s=4, log_json=False)


@pytest.fixture(scope="session")
def prod_client(prod_settings: Settings) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app(prod_settings)) as client:
        yield client


def new_key(settings: Settings, tenant: str | None = None) -> str:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        key = repository.create_api_key(session, tenant or f"tenant-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    return key


@pytest.fixture
def auth(prod_settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_key(prod_settings)}"}
