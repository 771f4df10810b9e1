"""The chaos soak: PostgreSQL restarted, Redis restarted (empty: no persistence), the worker SIGKILLed, each
over a run of tiny scans with clients polling; prints and writes scans submitted / succeeded / lost /
duplicated and the seconds of 503 around each restart.

    python bench/chaos_bench.py [--scans 20] [--pg-restarts 3] [--redis-restarts 3] [--kills 20] [--vanish 3]
                                [--out bench/results/chaos.md]

Everything runs on loopback: a private PostgreSQL 15 and Redis (never the shared ones), the API in this process,
one supervised Celery worker. The CI-sized version of each scenario is tests/integration/test_chaos.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.chaos_harness import (  # noqa: E402
    ChaosEnv,
    Outcome,
    kill_with_redis_restart,
    postgres_restarts,
    redis_restarts,
    worker_kills,
)
from bench.provenance import commit, machine  # noqa: E402


def _row(out: Outcome) -> str:
    f = out.figures
    per = ", ".join(f"{s:.1f}" for s in out.outage_503_s) or "–"
    refused = sum(1 for p in out.refused if p.status == 503)
    codes = f.status_codes
    other_5xx = sum(v for k, v in codes.items() if k.startswith("5") and k != "503")
    return (f"| {f.fault} | {f.faults} | {f.submitted} | {f.succeeded} | {f.lost} | {f.duplicated} | "
            f"{f.claimed_again} | {f.resent} | {per} | {codes.get('200', 0)} / {codes.get('503', 0)} / "
            f"{other_5xx} | {refused} | {f.wall_s:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=20, help="scans per scenario (the kill run takes kills + 5)")
    ap.add_argument("--pg-restarts", type=int, default=3)
    ap.add_argument("--redis-restarts", type=int, default=3)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--vanish", type=int, default=3,
                    help="rounds of a worker SIGKILL together with a Redis restart (the running task is lost)")
    ap.add_argument("--down-s", type=float, default=3.0, help="seconds each service stays down")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/chaos.md")
    args = ap.parse_args()

    outcomes: list[Outcome] = []
    code_version = commit()  # before the results are written, which would make the tree look dirty
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="antidote-chaos-") as tmp, ChaosEnv(Path(tmp)) as env:
        if args.pg_restarts:
            outcomes.append(postgres_restarts(env, args.scans, args.pg_restarts, args.down_s, timeout_s=600))
            print(outcomes[-1].figures, flush=True)
        if args.redis_restarts:
            outcomes.append(redis_restarts(env, args.scans, args.redis_restarts, args.down_s, timeout_s=600))
            print(outcomes[-1].figures, flush=True)
        if args.kills:
            outcomes.append(worker_kills(env, max(args.scans, args.kills + 5), args.kills, timeout_s=1200))
            print(outcomes[-1].figures, flush=True)
        if args.vanish:
            outcomes.append(kill_with_redis_restart(env, args.vanish + 3, args.vanish, timeout_s=600))
            print(outcomes[-1].figures, flush=True)
    total = time.monotonic() - t0

    command = " ".join(["python bench/chaos_bench.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        "# Chaos: PostgreSQL and Redis restarts, SIGKILLed workers",
        "",
        f"Machine: {machine()}. Commit {code_version}. Command: `{command}` ({total:.0f} s in all).",
        "",
        "A private PostgreSQL 15 and Redis (no persistence) on loopback, the API in the bench process with two "
        "threads polling `GET /scans/{id}` and a client submitting a scan every 0.5 s during each restart, one "
        "Celery worker (`--concurrency 1`) restarted by a supervisor whenever it dies. Scans are tiny (a random "
        f"ResNet-20 on 8x8 images). Each service stays down {args.down_s:.0f} s per restart.",
        "",
        "| fault | faults | scans submitted | succeeded | lost | duplicated | claimed again | tasks sent again | "
        "seconds of 503 per restart | GET answers 200 / 503 / other 5xx | submissions refused (503) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(o) for o in outcomes),
        "",
        "*lost*: not in a final state at the end; *duplicated*: the worker's pipeline ran to completion more than "
        "once for one scan (its `pipeline finished` log line counted over every worker); *claimed again*: a worker "
        "died under the scan and its redelivered task ran it anew; *tasks sent again*: scans whose task Redis "
        "forgot (queued ones, and running ones whose worker died too), sent again by the API's sweep "
        "(`api/recovery.py`). The submitted count includes the "
        "scans accepted (202) during the restarts. For Redis the seconds of 503 are those of the refused "
        "submissions (reading a scan needs no broker, so every GET answered 200).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    payload = {"machine": machine(), "commit": code_version, "command": command, "total_s": round(total, 1),
               "scenarios": [{**o.figures.as_dict(), "seconds_of_503_per_restart": o.outage_503_s,
                              "submissions_refused_503": sum(1 for p in o.refused if p.status == 503)}
                             for o in outcomes]}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
