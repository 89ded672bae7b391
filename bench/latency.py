"""Enqueue -> start latency across processes, at a steady rate, on SQLite and PostgreSQL.

    python -m bench.latency                               # both, 100 runs/s for 5 s
    python -m bench.latency --db sqlite --rate 200 --seconds 10
    python -m bench.latency --durability full --json      # also one JSON line on stdout

This process enqueues runs of `stamp` one `retrier.run()` at a time, on a fixed
schedule (run i at t0 + i/rate), with `time.time()` taken just before the call in its
args; ONE worker in another process (`python -m retrier worker
bench.latency_app:retrier`, default settings: wake-ups, not a short poll) runs them,
and the action appends time.time() at its start to a file. Latency = start -
enqueue time, so it includes the enqueue's own commit, the wake-up of the other
process, its claim and the dispatch to the action. Warm-up runs (a few, before the
clock) are left out. Targets: SQLite p50 <= 5 ms, p95 <= 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.latency_app import build
from bench.throughput import ROOT, fresh_database

console = Console(stderr=True)
TARGETS = {"sqlite": (5.0, 10.0)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(len(ordered) * q / 100) - 1))]


def measure(kind: str, rate: float, seconds: float, durability: str,
            concurrency: int) -> dict[str, Any]:
    with fresh_database(kind) as url, tempfile.TemporaryDirectory() as tmp:
        stamps = Path(tmp) / "stamps.txt"
        retrier = build(url, str(stamps), durability=durability)  # creates the tables
        env = {**os.environ, "TIERS_BENCH_DB": url, "TIERS_BENCH_STAMPS": str(stamps),
               "TIERS_BENCH_C": str(concurrency), "TIERS_BENCH_DURABILITY": durability,
               "TIERS_LOG_LEVEL": "WARNING"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "retrier", "worker", "bench.latency_app:retrier"],
            cwd=ROOT, env=env)
        try:
            # warm-up: the worker is up, registered and idle once these have run
            warm = [retrier.run("stamp", {"enqueued": time.time(), "seq": -1 - i})
                    for i in range(5)]
            retrier.wait_all(warm, timeout=60)
            time.sleep(0.5)
            total = int(rate * seconds)
            ids, enqueue_ms = [], []
            t0 = time.perf_counter()
            for i in range(total):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                before = time.perf_counter()
                ids.append(retrier.run("stamp", {"enqueued": time.time(), "seq": i}))
                enqueue_ms.append((time.perf_counter() - before) * 1000)
            achieved = total / (time.perf_counter() - t0)
            retrier.wait_all(ids, timeout=120)
        finally:
            worker.terminate()
            worker.wait(30)
            retrier.close()
        lat = []
        for line in stamps.read_text().splitlines():
            seq, enqueued, started = line.split()
            if int(seq) >= 0:
                lat.append((float(started) - float(enqueued)) * 1000)
    assert len(lat) == total, (len(lat), total)
    return {"db": kind, "runs": total, "rate": achieved, "p50": pct(lat, 50),
            "p95": pct(lat, 95), "p99": pct(lat, 99), "max": max(lat),
            "mean": statistics.fmean(lat), "enqueue_p50": pct(enqueue_ms, 50)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--rate", type=float, default=100.0, help="runs enqueued per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--durability", choices=["normal", "full"], default="normal")
    parser.add_argument("--concurrency", type=int, default=16, help="the worker's")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]

    rows = []
    for kind in kinds:
        console.print(f"{kind}: {args.rate:g} runs/s for {args.seconds:g} s ...")
        rows.append(measure(kind, args.rate, args.seconds, args.durability, args.concurrency))

    table = Table("database", "runs", "rate /s", "p50 ms", "p95 ms", "p99 ms", "max ms",
                  "mean ms", "run() p50 ms", "target p50/p95",
                  title=(f"enqueue -> start, worker in another process, "
                         f"durability={args.durability}"))
    for r in rows:
        target = TARGETS.get(r["db"])
        verdict = "-"
        if target:
            ok = r["p50"] <= target[0] and r["p95"] <= target[1]
            r["target_met"] = ok
            verdict = f"<= {target[0]:g} / {target[1]:g}: {'met' if ok else 'MISSED'}"
        table.add_row(r["db"], str(r["runs"]), f"{r['rate']:.0f}", f"{r['p50']:.2f}",
                      f"{r['p95']:.2f}", f"{r['p99']:.2f}", f"{r['max']:.1f}",
                      f"{r['mean']:.2f}", f"{r['enqueue_p50']:.2f}", verdict)
    out = Console(width=max(Console().width, 110))
    out.print(table)
    out.print("Latency counts from just before run() (its commit included) to the action's "
              "first line in the worker process. Noisy machine: figures vary run to run.")
    if args.json:
        print(json.dumps({"bench": "latency", "rate": args.rate, "seconds": args.seconds,
                          "durability": args.durability, "rows": rows}))


if __name__ == "__main__":
    main()
