"""Shared fixtures: settings for the embedded default, and the real services of the integration tests
(PostgreSQL and Redis as this machine runs them, an S3 server started here with seaweedfs' ``weed mini``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.settings import Settings

os.environ.setdefault("AWS_ACCESS_KEY_ID", "antidote-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "antidote-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

PG_ADMIN_URL = os.environ.get("ANTIDOTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ANTIDOTE_TEST_REDIS", "redis://127.0.0.1:6379/13")


@pytest.fixture
def embedded_settings(tmp_path: Path) -> Settings:
    """The embedded default under a fresh folder: SQLite, a folder broker, local object storage."""
    return Settings(data_dir=tmp_path / "data", database_url=None, broker_url=None, storage_url=None,
                    log_json=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test session, dropped afterwards."""
    import psycopg

    name = f"antidote_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    return REDIS_URL


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (seaweedfs ``weed mini``) on loopback, started for the session."""
    if url := os.environ.get("ANTIDOTE_TEST_S3_ENDPOINT"):
        yield url
        return
    weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")  # type: ignore[attr-defined]
    folder = tmp_path_factory.mktemp("weed")
    ports = {"master": 19633, "volume": 19640, "filer": 19688, "s3": 19633 + 700}
    if any(_port_open(p) for p in ports.values()):
        pytest.fail(f"a port of {ports} is taken; set ANTIDOTE_TEST_S3_ENDPOINT to use a running S3 server")
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         f"-s3.port={ports['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait_for_s3(endpoint, proc, folder / "weed.log")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_for_s3(endpoint: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed mini exited: {log.read_text()[-2000:]}")
        try:
            client.list_buckets()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    pytest.fail(f"weed mini did not answer within 90 s: {log.read_text()[-2000:]}")
