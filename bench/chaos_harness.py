"""Faults in the real components, shared by tests/integration/test_chaos.py and bench/chaos_bench.py.

A private PostgreSQL and a private Redis (so they may be restarted: never the shared ones), the API in this
process, one Celery worker kept alive by a supervisor thread, tiny scans, pollers that record every status
code, and the figures a chaos run reports: scans submitted / succeeded / lost / duplicated and the seconds of
503 around each fault. A scan "ran twice" when its worker logged ``pipeline finished`` for it more than once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.services import PrivatePostgres, PrivateRedis, kill_group

ROOT = Path(__file__).resolve().parents[1]
SPEC = json.dumps({"mode": "scan", "model": {"architecture": "resnet20", "num_classes": 10, "in_channels": 1,
                                             "mean": [0.5], "std": [0.5]},
                   "detect": {"enabled": False}})  # the detector's search would dominate the soak's seconds
TERMINAL = {"succeeded", "failed", "canceled"}


def scan_parts(test_images: int = 64, seed: int = 0) -> dict[str, tuple[str, bytes]]:
    """A random ResNet-20 on 8x8 grey images with a clean subset and a test set: a scan of a second or so."""
    import torch
    from safetensors.torch import save

    from core.models.registry import create_model

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in create_model("resnet20", 10, 1).state_dict().items()}
    rng = np.random.default_rng(seed)

    def npz(n: int) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, x=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), y=np.arange(n) % 10)
        return buf.getvalue()

    return {"model": ("model.safetensors", save(state)), "clean_data": ("clean.npz", npz(40)),
            "test_data": ("test.npz", npz(test_images))}


class WorkerSupervisor:
    """Keeps one Celery worker (``--concurrency 1``) running, starting a new one whenever it dies, as systemd
    or Kubernetes would; ``kill()`` SIGKILLs the whole worker (main process and pool child)."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="worker-supervisor")

    def start(self) -> WorkerSupervisor:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", self.env["ANTIDOTE_QUEUE"],
               "--concurrency", "1", "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
               "--without-heartbeat", "--loglevel", "INFO"]
        self.starts += 1
        out = open(self.log_dir / f"worker-{self.starts:02d}.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                if self.proc is not None and self.proc.poll() is not None:
                    self._spawn()

    def kill(self) -> None:
        with self._lock:
            if self.proc is None:
                return
            kill_group(self.proc, signal.SIGKILL)
            self._spawn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self.proc is not None:
                kill_group(self.proc, signal.SIGTERM)
                self.proc = None

    def finished_pipelines(self) -> Counter[str]:
        """How many times each scan's pipeline ran to completion, over every worker this supervisor started."""
        counts: Counter[str] = Counter()
        for path in sorted(self.log_dir.glob("worker-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if '"pipeline finished"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("message") == "pipeline finished" and record.get("scan_id"):
                    counts[record["scan_id"]] += 1
        return counts



class _Resent(logging.Handler):
    """Collects the scan ids the API's recovery sent again (its log records carry them)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("sent a scan again"):
            self.ids.append(str(getattr(record, "scan_id", "")))


@dataclass
class Poll:
    t: float
    status: int
    body: dict[str, Any]
    retry_after: str | None


@dataclass
class Fault:
    kind: str
    started: float
    ended: float


@dataclass
class ChaosEnv:
    """The whole production stack on loopback with faults at hand. Use as a context manager."""

    root: Path
    visibility_timeout_s: int = 3
    sweep_interval_s: float = 1.0
    recovery_grace_s: float = 2.0
    pg: PrivatePostgres = field(init=False)
    redis: PrivateRedis = field(init=False)
    faults: list[Fault] = field(default_factory=list)

    def __enter__(self) -> ChaosEnv:
        from fastapi.testclient import TestClient

        from api.app import create_app
        from store.db import upgrade_database
        from store.settings import Settings

        self.pg = PrivatePostgres().init()
        upgrade_database(self.pg.url)
        self.redis = PrivateRedis(self.root / "redis").start()
        self.settings = Settings(
            data_dir=self.root / "data", database_url=self.pg.url, broker_url=self.redis.url,
            storage_url=(self.root / "objects").resolve().as_uri(), queue="chaos",
            broker_visibility_timeout_s=self.visibility_timeout_s, stale_sweep_interval_s=self.sweep_interval_s,
            broker_recovery_grace_s=self.recovery_grace_s, db_retry_max_interval_s=1.0, key_cache_s=3600,
            worker_heartbeat_s=1.0,
            read_pool_timeout_s=1.0,  # GETs answer 503 after 1 s of a database outage instead of waiting it out
            log_json=False)
        self.resent = _Resent()
        logging.getLogger("antidote.api").addHandler(self.resent)
        self.client = TestClient(create_app(self.settings))
        self.client.__enter__()
        self.supervisor = WorkerSupervisor(self._worker_env(), self.root / "logs").start()
        self.key = self._new_key()
        self.auth = {"Authorization": f"Bearer {self.key}"}
        return self

    def __exit__(self, *_exc: object) -> None:
        self.supervisor.stop()
        self.client.__exit__(None, None, None)
        logging.getLogger("antidote.api").removeHandler(self.resent)
        self.redis.stop()
        self.pg.remove()

    def _worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANTIDOTE_")}
        s = self.settings
        env.update({"ANTIDOTE_DATA_DIR": str(s.data_dir), "ANTIDOTE_DATABASE_URL": s.resolved_database_url,
                    "ANTIDOTE_BROKER_URL": s.resolved_broker_url, "ANTIDOTE_STORAGE_URL": s.resolved_storage_url,
                    "ANTIDOTE_QUEUE": s.queue,
                    "ANTIDOTE_BROKER_VISIBILITY_TIMEOUT_S": str(s.broker_visibility_timeout_s),
                    "ANTIDOTE_DB_RETRY_MAX_INTERVAL_S": str(s.db_retry_max_interval_s), "ANTIDOTE_DEVICE": "cpu",
                    "ANTIDOTE_WORKER_HEARTBEAT_S": str(s.worker_heartbeat_s),
                    "ANTIDOTE_LOG_JSON": "true", "OMP_NUM_THREADS": "1"})
        return env

    def _new_key(self) -> str:
        from store import repository
        from store.db import make_engine, make_session_factory

        engine = make_engine(self.pg.url)
        with make_session_factory(engine)() as session:
            key = repository.create_api_key(session, f"chaos-{uuid.uuid4().hex[:8]}")
        engine.dispose()
        return key

    # --- clients -------------------------------------------------------------------------------------------

    def submit(self, n: int, parts: dict[str, tuple[str, bytes]]) -> list[str]:
        ids = []
        for _ in range(n):
            r = self.client.post("/scans", headers=self.auth, files=parts, data={"spec": SPEC})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        return ids

    def statuses(self, ids: list[str]) -> dict[str, str]:
        """Each scan's status straight from the database (not through the API under test)."""
        from sqlalchemy import create_engine, select
        from sqlalchemy.pool import NullPool

        from store.models import Scan

        engine = create_engine(self.pg.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(Scan.id, Scan.status).where(Scan.id.in_(ids))).all()
        finally:
            engine.dispose()
        return {scan_id: status for scan_id, status in rows}

    def attempts(self, ids: list[str]) -> dict[str, int]:
        """How many times each scan was claimed (more than once: a worker died under it)."""
        from sqlalchemy import create_engine, select
        from sqlalchemy.pool import NullPool

        from store.models import Scan

        engine = create_engine(self.pg.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return dict(conn.execute(select(Scan.id, Scan.attempts).where(Scan.id.in_(ids))).all())
        finally:
            engine.dispose()

    def wait_terminal(self, ids: list[str], timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                statuses = self.statuses(ids)
            except Exception:  # noqa: BLE001 - the database may be down at this moment
                statuses = {}
            if len(statuses) == len(ids) and all(s in TERMINAL for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                return statuses
            time.sleep(0.25)

    def wait_succeeded(self, ids: list[str], count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(s == "succeeded" for s in self.statuses(ids).values()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} scans succeeded within {timeout_s:.0f} s")
            time.sleep(0.1)


class Poller:
    """Clients polling ``GET /scans/{id}`` round robin from ``threads`` threads, recording every answer."""

    def __init__(self, env: ChaosEnv, ids: list[str], threads: int = 2, pause_s: float = 0.05) -> None:
        self.env, self.ids, self.pause_s = env, ids, pause_s
        self.polls: list[Poll] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Poller:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _loop(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            scan_id = self.ids[i % len(self.ids)]
            i += 1
            try:
                r = self.env.client.get(f"/scans/{scan_id}", headers=self.env.auth)
            except Exception as exc:  # noqa: BLE001 - a broken answer is a finding, recorded as status 0
                self.polls.append(Poll(time.monotonic(), 0, {"_error": repr(exc)[:300]}, None))
                self._stop.wait(self.pause_s)
                continue
            try:
                body = r.json()
            except ValueError:
                body = {"_text": r.text[:200]}
            self.polls.append(Poll(time.monotonic(), r.status_code, body, r.headers.get("retry-after")))
            self._stop.wait(self.pause_s)

    def codes(self) -> Counter[int]:
        return Counter(p.status for p in self.polls)

    def seconds_of(self, status: int) -> float:
        """From the first to the last answer with ``status`` (0 when there was none)."""
        times = [p.t for p in self.polls if p.status == status]
        return round(times[-1] - times[0], 2) if times else 0.0


@dataclass
class Figures:
    """What a chaos run reports."""

    fault: str
    submitted: int
    succeeded: int
    lost: int
    duplicated: int
    statuses: dict[str, int]
    faults: int
    status_codes: dict[str, int]
    seconds_of_503: float
    resent: int
    claimed_again: int
    worker_starts: int
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def figures(env: ChaosEnv, fault: str, ids: list[str], statuses: dict[str, str], poller: Poller | None,
            faults: int, t0: float) -> Figures:
    finished = env.supervisor.finished_pipelines()
    by_status = Counter(statuses.get(i, "missing") for i in ids)
    return Figures(
        fault=fault, submitted=len(ids), succeeded=by_status["succeeded"],
        lost=sum(1 for i in ids if statuses.get(i) not in TERMINAL),
        duplicated=sum(1 for i in ids if finished[i] > 1), statuses=dict(by_status), faults=faults,
        status_codes={str(k): v for k, v in sorted((poller.codes() if poller else Counter()).items())},
        seconds_of_503=poller.seconds_of(503) if poller else 0.0,
        resent=len(set(env.resent.ids) & set(ids)),
        claimed_again=sum(1 for a in env.attempts(ids).values() if a > 1), worker_starts=env.supervisor.starts,
        wall_s=round(time.monotonic() - t0, 1))


class Submitter:
    """A client that keeps submitting one scan every ``pause_s`` (CI pipelines do not stop for an outage):
    each 202 joins ``ids`` and must end ``succeeded``; each other answer is recorded."""

    def __init__(self, env: ChaosEnv, parts: dict[str, tuple[str, bytes]], ids: list[str],
                 pause_s: float = 0.5) -> None:
        self.env, self.parts, self.ids, self.pause_s = env, parts, ids, pause_s
        self.refused: list[Poll] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Submitter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.env.client.post("/scans", headers=self.env.auth, files=self.parts, data={"spec": SPEC})
            except Exception as exc:  # noqa: BLE001 - as in Poller
                self.refused.append(Poll(time.monotonic(), 0, {"_error": repr(exc)[:300]}, None))
                self._stop.wait(self.pause_s)
                continue
            if r.status_code == 202:
                self.ids.append(r.json()["id"])
            else:
                try:
                    body = r.json()
                except ValueError:
                    body = {"_text": r.text[:200]}
                self.refused.append(Poll(time.monotonic(), r.status_code, body, r.headers.get("retry-after")))
            self._stop.wait(self.pause_s)


@dataclass
class Outcome:
    """One scenario's figures plus what the assertions look at."""

    figures: Figures
    polls: list[Poll]
    refused: list[Poll]
    outage_503_s: list[float]


def _per_fault_503(polls: list[Poll], faults: list[Fault]) -> list[float]:
    """For each fault, seconds from the first to the last 503 answered between its start and the next one's."""
    out = []
    for i, fault in enumerate(faults):
        until = faults[i + 1].started if i + 1 < len(faults) else float("inf")
        times = [p.t for p in polls if p.status == 503 and fault.started - 0.5 <= p.t < until]
        out.append(round(times[-1] - times[0], 2) if times else 0.0)
    return out


def _restart_scenario(env: ChaosEnv, kind: str, restart: Any, n: int, restarts: int, down_s: float,
                      timeout_s: float) -> Outcome:
    parts = scan_parts()
    t0 = time.monotonic()
    ids = env.submit(n, parts)
    faults: list[Fault] = []
    refused: list[Poll] = []
    with Poller(env, ids) as poller:
        for k in range(restarts):
            env.wait_succeeded(ids, max(1, (k + 1) * n // (restarts + 2)), timeout_s)
            with Submitter(env, parts, ids) as submitter:
                started = time.monotonic()
                restart(down_s)
                faults.append(Fault(kind, started, time.monotonic()))
                time.sleep(1.0)  # keep submitting a moment after it is back
            refused += submitter.refused
        statuses = env.wait_terminal(ids, timeout_s)
    polls = poller.polls
    fig = figures(env, f"{kind} restart", ids, statuses, poller, len(faults), t0)
    return Outcome(fig, polls, refused, _per_fault_503(sorted(polls + refused, key=lambda p: p.t), faults))


def postgres_restarts(env: ChaosEnv, n: int = 20, restarts: int = 1, down_s: float = 3.0,
                      timeout_s: float = 120) -> Outcome:
    """PostgreSQL stopped (fast shutdown: every session cut) and started again while scans run and clients poll."""
    return _restart_scenario(env, "postgres", env.pg.restart, n, restarts, down_s, timeout_s)


def redis_restarts(env: ChaosEnv, n: int = 20, restarts: int = 1, down_s: float = 3.0,
                   timeout_s: float = 120) -> Outcome:
    """Redis killed and started empty (no persistence: every queued task is gone) while scans run."""
    return _restart_scenario(env, "redis", env.redis.restart, n, restarts, down_s, timeout_s)


def worker_kills(env: ChaosEnv, n: int = 20, kills: int = 5, timeout_s: float = 240) -> Outcome:
    """SIGKILL the worker ``kills`` times, each time in the middle of a scan's evaluation, never twice for the same
    scan (three deaths fail a scan with ``worker_lost`` by design); the supervisor starts a new worker. More
    scans are submitted while the kills are not all done and none is waiting."""
    from sqlalchemy import create_engine, func, select
    from sqlalchemy.pool import NullPool

    from store.models import Scan

    parts = scan_parts(test_images=1500)
    t0 = time.monotonic()
    ids = env.submit(n, parts)
    engine = create_engine(env.pg.url, poolclass=NullPool)
    faults: list[Fault] = []
    killed: set[str] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while len(faults) < kills and time.monotonic() < deadline:
            victim = _victim(engine, ids, killed)
            with engine.connect() as conn:
                waiting = conn.scalar(select(func.count()).select_from(Scan).where(
                    Scan.id.in_(ids), Scan.status == "queued"))
            if not waiting:  # keep scans coming that have never been killed, until every kill is done
                ids += env.submit(3, parts)
            if victim is None:
                time.sleep(0.02)
                continue
            started = time.monotonic()
            env.supervisor.kill()
            killed.add(victim)
            faults.append(Fault("worker SIGKILL", started, time.monotonic()))
    finally:
        engine.dispose()
    statuses = env.wait_terminal(ids, timeout_s)
    fig = figures(env, "worker SIGKILL", ids, statuses, None, len(faults), t0)
    return Outcome(fig, [], [], [])


def _victim(engine: Any, ids: list[str], killed: set[str]) -> str | None:
    """A scan being evaluated that no worker died under yet (a killed one keeps its row until redelivered)."""
    from sqlalchemy import select

    from store.models import Scan

    with engine.connect() as conn:
        return conn.scalar(select(Scan.id).where(Scan.id.in_(ids), Scan.id.not_in(killed or {""}),
                                                 Scan.status == "running", Scan.stage == "evaluate_before",
                                                 Scan.attempts == 1))


def kill_with_redis_restart(env: ChaosEnv, n: int = 4, rounds: int = 1, timeout_s: float = 180) -> Outcome:
    """The worker SIGKILLed mid-scan and Redis restarted empty at the same moment: the running scan's task is gone
    with Redis and its worker with the kill, so no redelivery will ever come; the API's recovery finds it
    silent (no heartbeat) and absent from the broker, puts it back in the queue and sends it again."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    parts = scan_parts(test_images=1500)
    t0 = time.monotonic()
    ids = env.submit(n, parts)
    engine = create_engine(env.pg.url, poolclass=NullPool)
    faults: list[Fault] = []
    killed: set[str] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while len(faults) < rounds and time.monotonic() < deadline:
            victim = _victim(engine, ids, killed)
            if victim is None:
                if set(env.statuses(ids).values()) <= TERMINAL:  # nothing left to kill under: more scans
                    ids += env.submit(2, parts)
                time.sleep(0.02)
                continue
            started = time.monotonic()
            env.redis.stop()
            env.supervisor.kill()
            env.redis.start()
            killed.add(victim)
            faults.append(Fault("worker SIGKILL + redis restart", started, time.monotonic()))
    finally:
        engine.dispose()
    statuses = env.wait_terminal(ids, timeout_s)
    return Outcome(figures(env, "worker SIGKILL + redis restart", ids, statuses, None, len(faults), t0), [], [], [])
