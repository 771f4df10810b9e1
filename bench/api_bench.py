"""The API's numbers on this machine, on the production configuration (PostgreSQL, Redis, an S3 server):

1. time to accept a 45 MB checkpoint upload (PreAct-ResNet18 safetensors + a small clean set): from the first
   byte sent to the 202, which covers streaming, validation (the state dict is checked against the
   architecture), the copy to S3, the database row and the enqueue;
2. requests/s and latency percentiles of ``GET /scans/{id}`` under 50 concurrent clients, from ``wrk`` in a
   second process (Debian package ``wrk``), loopback only, beside the same figures of a bare anchor
   (``bench/anchor_app.py``) run in the same session with the same number of worker processes, and their ratio.

    python bench/api_bench.py [--uploads 10] [--duration 20] [--workers 2] [--rounds 3] [--out bench/results/api.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.anchor_app import seed  # noqa: E402
from bench.provenance import commit, machine  # noqa: E402
from bench.services import create_database, drop_database, free_port, start_weed_mini, stop  # noqa: E402
from core.models.checkpoint import save_safetensors  # noqa: E402
from core.models.registry import create_model  # noqa: E402


def wait_ready(url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.3)


def start_server(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class WrkRun:
    """One ``wrk`` run's figures: requests/s and latency percentiles in milliseconds."""

    rps: float
    p50: float
    p90: float
    p99: float
    errors: int
    raw: str


def to_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, token: str, connections: int, duration: int) -> WrkRun:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency",
                          "-H", f"Authorization: Bearer {token}", url],
                         capture_output=True, text=True, check=True).stdout
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M))
    if not {"50", "90", "99"} <= lat.keys():
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    errors += sum(int(g) for g in socket_errors.groups()) if socket_errors else 0
    return WrkRun(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
                  to_ms(lat["50"]), to_ms(lat["90"]), to_ms(lat["99"]), errors, out)


FRAME = re.compile(r"[\w.<>]+ \([^()]+\)")


def profile(pid: int, url: str, token: str, connections: int, duration: int, work: Path, out: Path) -> None:
    """``py-spy record`` over the server and its worker processes during one wrk run; the frames that cost most."""
    raw = work / "profile.txt"
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                            "--subprocesses", "--nonblocking", "--rate", "200", "--duration", str(duration),
                            "--format", "raw", "--output", str(raw)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    run_wrk(url, token, connections, duration)
    spy.wait(timeout=duration + 60)
    inclusive: Counter[str] = Counter()
    total, site = 0, str(Path(np.__file__).parents[1]) + "/"
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = {re.sub(r":\d+\)$", ")", f).replace(site, "") for f in stack.split(";")}
        for frame in frames:
            if FRAME.fullmatch(frame):  # not the "process N: command line" roots py-spy adds
                inclusive[frame] += n
    rows = [f"| {100 * n / total:.1f} % | `{frame[:140]}` |" for frame, n in inclusive.most_common(60)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"py-spy, {total} samples over the API's processes under wrk ({connections} clients, "
                   f"{duration} s): share of samples in which each frame is on the stack.\n\n| share | frame |\n"
                   "|---|---|\n" + "\n".join(rows) + "\n")


def upload_scans(url: str, key: str, work: Path, n: int) -> tuple[list[float], float, str]:
    """``n`` uploads of a PreAct-ResNet18 checkpoint; returns their times, the size in MB and the last scan id."""
    torch.manual_seed(0)
    model_path = work / "preactresnet18.safetensors"
    save_safetensors(create_model("preactresnet18", 10, 3).state_dict(), model_path)
    rng = np.random.default_rng(0)
    clean_path = work / "clean.npz"
    np.savez(clean_path, x=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 100))
    spec = json.dumps({"mode": "scan", "model": {"architecture": "preactresnet18", "num_classes": 10}})
    model_bytes, clean_bytes = model_path.read_bytes(), clean_path.read_bytes()
    times, scan_id = [], ""
    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            r = http.post("/scans", headers={"Authorization": f"Bearer {key}"}, data={"spec": spec},
                          files={"model": ("m.safetensors", model_bytes), "clean_data": ("c.npz", clean_bytes)})
            times.append(time.perf_counter() - t0)
            assert r.status_code == 202, r.text
            scan_id = r.json()["id"]
    return times, len(model_bytes) / 1e6, scan_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=10)
    ap.add_argument("--duration", type=int, default=20, help="seconds of wrk load per round and server")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="uvicorn worker processes, the same for the API and the anchor")
    ap.add_argument("--rounds", type=int, default=3, help="alternating API/anchor wrk runs; medians reported")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/api.md")
    ap.add_argument("--s3-endpoint", default=None,
                    help="an S3 server already running (AWS_* credentials from the environment); default: start "
                    "weed mini on its fixed ports")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also profile the API's processes with py-spy under one more wrk run; write a summary here")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "antidote-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "antidote-bench-secret")

    work = Path(tempfile.mkdtemp(prefix="antidote-bench-"))
    weed, endpoint = (None, args.s3_endpoint) if args.s3_endpoint else start_weed_mini(work)
    db, anchor_db = create_database("antidote_bench"), create_database("antidote_anchor")
    port, anchor_port = free_port(), free_port()
    env = {**os.environ, "ANTIDOTE_DATABASE_URL": db, "ANTIDOTE_BROKER_URL": "redis://127.0.0.1:6379/12",
           "ANTIDOTE_STORAGE_URL": "s3://antidote-bench", "ANTIDOTE_S3_ENDPOINT_URL": endpoint,
           "ANTIDOTE_DATA_DIR": str(work / "data"), "ANTIDOTE_LOG_LEVEL": "WARNING"}
    anchor_dsn = anchor_db.replace("postgresql+psycopg://", "postgresql://")
    anchor_token, anchor_id = secrets.token_urlsafe(32), str(uuid.uuid4())
    anchor_env = {**os.environ, "ANCHOR_DATABASE_URL": anchor_dsn, "ANCHOR_TOKEN": anchor_token}
    cli = [sys.executable, "-m", "cli.main"]
    subprocess.run([*cli, "migrate"], env=env, cwd=ROOT, check=True)
    key = subprocess.run([*cli, "keys", "create", "--tenant", "bench"], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    seed(anchor_dsn, anchor_id)
    server = start_server([*cli, "serve", "--port", str(port), "--workers", str(args.workers)], env,
                          work / "serve.log")
    anchor = start_server([sys.executable, "-m", "uvicorn", "bench.anchor_app:app", "--host", "127.0.0.1",
                           "--port", str(anchor_port), "--workers", str(args.workers), "--no-access-log",
                           "--log-level", "warning"], anchor_env, work / "anchor.log")
    url, anchor_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{anchor_port}"
    ours: list[WrkRun] = []
    theirs: list[WrkRun] = []
    try:
        wait_ready(f"{url}/readyz", work / "serve.log")
        wait_ready(f"{anchor_url}/docs", work / "anchor.log")
        times, size_mb, scan_id = upload_scans(url, key, work, args.uploads)
        targets = [(f"{url}/scans/{scan_id}", key, ours), (f"{anchor_url}/scans/{anchor_id}", anchor_token, theirs)]
        for target, token, _ in targets:  # warm both: pools filled, code paths imported
            run_wrk(target, token, args.connections, 2)
        for _ in range(args.rounds):
            for target, token, runs in targets:
                runs.append(run_wrk(target, token, args.connections, args.duration))
        if args.profile:
            profile(server.pid, targets[0][0], key, args.connections, args.duration, work, args.profile)
    finally:
        stop_server(server)
        stop_server(anchor)
        if weed is not None:
            stop(weed)
        drop_database(db)
        drop_database(anchor_db)

    def med(runs: list[WrkRun], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs)

    rps, anchor_rps = med(ours, "rps"), med(theirs, "rps")
    p99, anchor_p99 = med(ours, "p99"), med(theirs, "p99")
    upload_med = statistics.median(times)
    command = (f"python bench/api_bench.py --uploads {args.uploads} --duration {args.duration} --workers "
               f"{args.workers} --rounds {args.rounds} --connections {args.connections}")
    lines = [
        f"Machine: {machine()}. Commit {commit()}. Command: `{command}`.",
        "Production configuration on loopback: PostgreSQL, Redis, seaweedfs `weed mini` as S3; "
        f"`antidote serve --workers {args.workers}` beside the bare anchor (`bench/anchor_app.py`: FastAPI, an async "
        f"psycopg pool, one indexed row, a header check) under uvicorn with {args.workers} worker processes; the "
        "load generator (`wrk -t2`) shares the machine's cores with both servers. Both servers run during the whole "
        f"measurement; the {args.rounds} rounds of {args.duration} s alternate API and anchor; medians.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| accept a {size_mb:.1f} MB checkpoint upload (POST /scans → 202), median of {len(times)} | "
        f"{upload_med:.2f} s ({size_mb / upload_med:.0f} MB/s) |",
        f"| same, min / max | {min(times):.2f} s / {max(times):.2f} s |",
        "",
        f"`GET /scans/{{id}}`, {args.connections} concurrent clients:",
        "",
        "| server | requests/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
        f"| Antidote API | {rps:,.0f} | {med(ours, 'p50'):.1f} | {med(ours, 'p90'):.1f} | {p99:.1f} | "
        f"{sum(r.errors for r in ours)} |",
        f"| bare anchor | {anchor_rps:,.0f} | {med(theirs, 'p50'):.1f} | {med(theirs, 'p90'):.1f} | "
        f"{anchor_p99:.1f} | {sum(r.errors for r in theirs)} |",
        f"| ratio API / anchor | **{rps / anchor_rps:.2f}x** (target >= 0.8x) | "
        f"{med(ours, 'p50') / med(theirs, 'p50'):.2f}x | {med(ours, 'p90') / med(theirs, 'p90'):.2f}x | "
        f"**{p99 / anchor_p99:.2f}x** (target <= 1.25x) | |",
        "",
        "Each round (requests/s, p99 ms), API vs anchor: "
        + "; ".join(f"{a.rps:,.0f} / {a.p99:.1f} vs {b.rps:,.0f} / {b.p99:.1f}"
                    for a, b in zip(ours, theirs, strict=True)) + ".",
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(ours[-1].raw)
    print(theirs[-1].raw)


if __name__ == "__main__":
    main()
