"""The API's numbers on this machine, on the production configuration (PostgreSQL, Redis, an S3 server):

1. time to accept a 45 MB checkpoint upload (PreAct-ResNet18 safetensors + a small clean set): from the first
   byte sent to the 202, which covers streaming, validation (the state dict is checked against the
   architecture), the copy to S3, the database row and the enqueue;
2. requests/s and latency percentiles of ``GET /scans/{id}`` under 50 concurrent clients, from ``wrk`` in a
   second process (Debian package ``wrk``), loopback only.

    python bench/api_bench.py [--uploads 10] [--duration 20] [--out bench/results/api.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.services import create_database, drop_database, start_weed_mini, stop  # noqa: E402
from core.models.checkpoint import save_safetensors  # noqa: E402
from core.models.registry import create_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=10)
    ap.add_argument("--duration", type=int, default=20, help="seconds of wrk load")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/api.md")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "antidote-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "antidote-bench-secret")

    work = Path(tempfile.mkdtemp(prefix="antidote-bench-"))
    weed, endpoint = start_weed_mini(work)
    db = create_database("antidote_bench")
    port = free_port()
    env = {**os.environ, "ANTIDOTE_DATABASE_URL": db, "ANTIDOTE_BROKER_URL": "redis://127.0.0.1:6379/12",
           "ANTIDOTE_STORAGE_URL": "s3://antidote-bench", "ANTIDOTE_S3_ENDPOINT_URL": endpoint,
           "ANTIDOTE_DATA_DIR": str(work / "data"), "ANTIDOTE_LOG_LEVEL": "WARNING"}
    cli = [sys.executable, "-m", "cli.main"]
    subprocess.run([*cli, "migrate"], env=env, cwd=ROOT, check=True)
    key = subprocess.run([*cli, "keys", "create", "--tenant", "bench"], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    server = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env, cwd=ROOT, start_new_session=True,
                              stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError((work / "serve.log").read_text()[-2000:])
            time.sleep(0.3)

        torch.manual_seed(0)
        model_path = work / "preactresnet18.safetensors"
        save_safetensors(create_model("preactresnet18", 10, 3).state_dict(), model_path)
        rng = np.random.default_rng(0)
        clean_path = work / "clean.npz"
        np.savez(clean_path, x=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 100))
        spec = json.dumps({"mode": "scan", "model": {"architecture": "preactresnet18", "num_classes": 10}})
        model_bytes, clean_bytes = model_path.read_bytes(), clean_path.read_bytes()
        auth = {"Authorization": f"Bearer {key}"}
        times, scan_id = [], ""
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(args.uploads):
                t0 = time.perf_counter()
                r = http.post("/scans", headers=auth, data={"spec": spec},
                              files={"model": ("m.safetensors", model_bytes), "clean_data": ("c.npz", clean_bytes)})
                times.append(time.perf_counter() - t0)
                assert r.status_code == 202, r.text
                scan_id = r.json()["id"]

        wrk = subprocess.run(["wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
                              "-H", f"Authorization: Bearer {key}", f"{url}/scans/{scan_id}"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        stop(weed)
        drop_database(db)

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", wrk, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
    size_mb = len(model_bytes) / 1e6
    med = statistics.median(times)
    lines = [
        f"Machine: {machine()}. Commit {commit()}. Command: `python bench/api_bench.py --uploads {args.uploads} "
        f"--duration {args.duration}`.",
        "Production configuration on loopback: PostgreSQL 15, Redis 7, seaweedfs `weed mini` as S3; one uvicorn "
        "process (`antidote serve`); the load generator (`wrk -t2`) shares the machine's cores with the server.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| accept a {size_mb:.1f} MB checkpoint upload (POST /scans → 202), median of {len(times)} | "
        f"{med:.2f} s ({size_mb / med:.0f} MB/s) |",
        f"| same, min / max | {min(times):.2f} s / {max(times):.2f} s |",
        f"| GET /scans/{{id}}, {args.connections} concurrent clients, {args.duration} s: requests/s | {rps:,.0f} |",
        f"| GET /scans/{{id}} latency p50 / p90 / p99 | {lat.get('50')} / {lat.get('90')} / {lat.get('99')} |",
        f"| non-2xx answers during the load | {non2xx.group(1) if non2xx else 0} |",
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(wrk)


if __name__ == "__main__":
    main()
