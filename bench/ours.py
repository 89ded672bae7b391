"""durable-tiers on the peer workloads, with the same command line as bench/peers.

    python -m bench.ours noop --backend sqlite --n 2000 --concurrency 10 --durability full
    python -m bench.ours steps --backend postgres --n 500
    python -m bench.ours backoff --backend sqlite --n 20

`--durability full|normal` is passed to `Retrier(url, durability=...)`: SQLite
synchronous FULL or NORMAL; on PostgreSQL the engine's own writes with
synchronous_commit on or off. "normal" is the library's default.

`--fn` picks the no-op of the noop workload: `noop_sync` (default; a plain function,
like the peers' tasks, run on a worker thread) or `noop` (an async function, run on the
worker's event loop).

Prints one JSON line, like every `bench.peers.*` module, so bench/compare.py can run
durable-tiers and its peers the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from bench.throughput import DURABILITIES, backoff_lateness, throughput

DEFAULT_N = {"noop": 2000, "steps": 500, "backoff": 20, "workflows": 300}


def measure(workload: str, backend: str, n: int, concurrency: int, durability: str,
            fn: str) -> dict[str, Any]:
    kind = "postgresql" if backend.startswith("postgres") else "sqlite"
    out: dict[str, Any] = {"peer": "durable-tiers", "backend": backend, "workload": workload,
                           "n": n, "durability": durability}
    if workload == "noop":
        # One worker process with `concurrency` slots, like the peers' single consumer.
        out["runs_per_s"] = throughput(kind, n, workers=1, fn=fn, concurrency=concurrency,
                                       durability=durability)
        out["fn"] = fn
        out["note"] = (f"retrier.run() one at a time; 1 worker process, concurrency "
                       f"{concurrency}; {'sync' if fn == 'noop_sync' else 'async'} no-op")
    elif workload == "steps":
        from bench.workflow import sequential_ms_per_step

        out["ms_per_step"] = sequential_ms_per_step(kind, n, durability)
    elif workload == "workflows":
        from bench.workflow import concurrent_workflows_per_s

        out["workflows_per_s"] = concurrent_workflows_per_s(kind, n, durability)
        out["note"] = f"{n} workflows of 5 no-op steps started at once; in-process worker"
    elif workload == "backoff":
        p50, p95 = backoff_lateness(kind, n, durability)
        out.update(p50_ms=p50, p95_ms=p95)
    else:
        raise SystemExit(f"unknown workload {workload!r}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="durable-tiers on the peer workloads")
    parser.add_argument("workload", choices=sorted(DEFAULT_N))
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--durability", choices=DURABILITIES, default="normal")
    parser.add_argument("--fn", choices=["noop", "noop_sync"], default="noop_sync",
                        help="the noop workload's action (default: the sync no-op)")
    parser.add_argument("--timeout", type=float, default=300)  # accepted for symmetry
    args = parser.parse_args(argv)
    n = args.n or DEFAULT_N[args.workload]
    # Keep stdout for the one JSON line; progress and logs go to stderr.
    os.environ.setdefault("TIERS_LOG_LEVEL", "WARNING")
    with contextlib.redirect_stdout(sys.stderr):
        try:
            result = measure(args.workload, args.backend, n, args.concurrency,
                             args.durability, args.fn)
        except Exception as exc:
            result = {"peer": "durable-tiers", "backend": args.backend,
                      "workload": args.workload, "durability": args.durability,
                      "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
