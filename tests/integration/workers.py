"""Start and stop real Celery workers (separate processes, own process group) for the integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.services import kill_group
from store.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTIDOTE_")}
    env.update({
        "ANTIDOTE_DATA_DIR": str(settings.data_dir),
        "ANTIDOTE_LOG_JSON": "true",
        "ANTIDOTE_BROKER_VISIBILITY_TIMEOUT_S": str(settings.broker_visibility_timeout_s),
        "ANTIDOTE_DEVICE": "cpu",
    })
    for name in ("database_url", "broker_url", "storage_url", "s3_endpoint_url"):
        value = getattr(settings, name)
        if value:
            env[f"ANTIDOTE_{name.upper()}"] = value
    env["ANTIDOTE_QUEUE"] = settings.queue
    for name in Settings.model_fields:
        if name.startswith("webhook_"):  # the webhook tests' own allowlist and short retry delays
            env[f"ANTIDOTE_{name.upper()}"] = str(getattr(settings, name))
    return env


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", settings.queue,
           "--concurrency", "1", "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
           "--loglevel", "INFO"]
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[2])



def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, then the hard way."""
    kill_group(proc, signal.SIGTERM)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
