"""Shared fixtures: settings for the embedded default, and the real services of the integration tests
(PostgreSQL and Redis as this machine runs them, an S3 server started here with seaweedfs' ``weed mini``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.services import create_database, drop_database, start_weed_mini, stop
from store.settings import Settings

os.environ.setdefault("AWS_ACCESS_KEY_ID", "antidote-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "antidote-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

REDIS_URL = os.environ.get("ANTIDOTE_TEST_REDIS", "redis://127.0.0.1:6379/13")


@pytest.fixture
def embedded_settings(tmp_path: Path) -> Settings:
    """The embedded default under a fresh folder: SQLite, a folder broker, local object storage."""
    return Settings(data_dir=tmp_path / "data", database_url=None, broker_url=None, storage_url=None,
                    log_json=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test session, dropped afterwards."""
    url = create_database("antidote_test")
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (seaweedfs ``weed mini``) on loopback, started for the session."""
    if url := os.environ.get("ANTIDOTE_TEST_S3_ENDPOINT"):
        yield url
        return
    proc, endpoint = start_weed_mini(tmp_path_factory.mktemp("weed"))
    try:
        yield endpoint
    finally:
        stop(proc)
