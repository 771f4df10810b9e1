"""``antidote serve --workers 2`` on the embedded default: two API processes, exactly one Celery worker, every
one answering, and none left behind after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.test_embedded import _cli, _env, _free_port
from tests.integration.workers import wait_for

ANTIDOTE = [sys.executable, "-m", "cli.main"]


def children(pid: int) -> list[tuple[int, str]]:
    """Direct children of ``pid`` with their command lines, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return out


def alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def test_two_api_processes_one_worker(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", _free_port()
    key = _cli("keys", "create", "--tenant", "w", data_dir=data_dir).stdout.strip()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([*ANTIDOTE, "serve", "--port", str(port), "--workers", "2"], env=_env(data_dir),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, 0.25, "the server to be ready")
        kids = children(proc.pid)
        api = [pid for pid, cmd in kids if "spawn_main" in cmd]
        celery = [pid for pid, cmd in kids if "celery" in cmd and "worker" in cmd]
        assert len(api) == 2 and len(celery) == 1, kids
        # fresh connections land on either process; every answer is the tenant's (empty) page, no error
        for _ in range(20):
            with httpx.Client(base_url=url, timeout=10) as http:
                r = http.get("/scans", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}
        assert httpx.get(f"{url}/scans", headers={"Authorization": "Bearer adk_wrong"}).status_code == 401
        os.kill(proc.pid, signal.SIGTERM)  # to `serve` alone: it must stop its children itself
        proc.wait(timeout=60)
        wait_for(lambda: not any(alive(pid) for pid in api + celery), 30, 0.25, "every child to exit")
    finally:
        if proc.poll() is None or any(alive(pid) for pid in children(proc.pid)):
            os.killpg(proc.pid, signal.SIGKILL)
