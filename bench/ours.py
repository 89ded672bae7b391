"""durable-tiers on the peer workloads, with the same command line as bench/peers.

    python -m bench.ours noop --backend sqlite --n 2000 --concurrency 10
    python -m bench.ours steps --backend postgres --n 500
    python -m bench.ours backoff --backend sqlite --n 20

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

from bench.throughput import backoff_lateness, throughput

DEFAULT_N = {"noop": 2000, "steps": 500, "backoff": 20}


def measure(workload: str, backend: str, n: int, concurrency: int) -> dict[str, Any]:
    kind = "postgresql" if backend.startswith("postgres") else "sqlite"
    out: dict[str, Any] = {"peer": "durable-tiers", "backend": backend, "workload": workload,
                           "n": n}
    if workload == "noop":
        # One worker process with `concurrency` slots, like the peers' single consumer.
        out["runs_per_s"] = throughput(kind, n, workers=1, fn="noop", concurrency=concurrency)
        out["note"] = f"retrier.run() one at a time; 1 worker process, concurrency {concurrency}"
    elif workload == "steps":
        from bench.workflow import sequential_ms_per_step

        out["ms_per_step"] = sequential_ms_per_step(kind, n)
    elif workload == "backoff":
        p50, p95 = backoff_lateness(kind, n)
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
    parser.add_argument("--timeout", type=float, default=300)  # accepted for symmetry
    args = parser.parse_args(argv)
    n = args.n or DEFAULT_N[args.workload]
    # Keep stdout for the one JSON line; progress and logs go to stderr.
    os.environ.setdefault("TIERS_LOG_LEVEL", "WARNING")
    with contextlib.redirect_stdout(sys.stderr):
        try:
            result = measure(args.workload, args.backend, n, args.concurrency)
        except Exception as exc:
            result = {"peer": "durable-tiers", "backend": args.backend,
                      "workload": args.workload, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
