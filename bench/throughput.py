"""Retrier throughput and backoff timing, end to end, on SQLite and PostgreSQL.

    python -m bench.throughput                       # both databases, defaults
    python -m bench.throughput --db sqlite --n 20000 --workers 0 1 2
    python -m bench.throughput --db postgresql --workers 1 4
    python -m bench.throughput --observe             # metrics and tracing (SDK) on

Throughput: N no-op runs are enqueued one `run()` call at a time (each its own
transaction) while workers execute them; the clock stops when the last run has
completed. `--workers 0` runs the worker in the enqueuing process (`with retrier:`);
K > 0 starts K `python -m retrier worker` processes. The end is seen by counting the
completed runs every 5 ms (one indexed COUNT), as the peers' harnesses do, so the
measured time is not stretched by a waiter's back-off.

Backoff lateness: runs fail once and are retried after 250 ms; lateness is the start
of attempt 2 minus (end of attempt 1 + 250 ms), from the attempts table.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import text

from bench.apps import build
from retrier import Retrier

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("TIERS_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
console = Console(stderr=True)
COMPLETION_POLL_S = 0.005
DURABILITIES = ("full", "normal")


@contextmanager
def fresh_database(kind: str) -> Iterator[str]:
    """An empty database: a temp SQLite file, or a new PostgreSQL schema."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    libpq = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def worker_processes(
    url: str, count: int, concurrency: int, durability: str = "normal", observe: bool = False
) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {**os.environ, "TIERS_BENCH_DB": url, "TIERS_BENCH_C": str(concurrency),
           "TIERS_BENCH_DURABILITY": durability, "TIERS_LOG_LEVEL": "WARNING",
           "TIERS_BENCH_OBSERVE": "1" if observe else "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "retrier", "worker", "bench.apps:retrier"], cwd=ROOT, env=env
        )
        for _ in range(count)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def throughput(
    kind: str, n: int, workers: int, fn: str, concurrency: int, durability: str = "normal",
    observe: bool = False,
) -> float:
    with fresh_database(kind) as url:
        retrier = build(url, concurrency=concurrency, durability=durability, observe=observe)
        try:
            if workers == 0:
                with retrier:
                    return _enqueue_and_wait(retrier, n, fn)
            with worker_processes(url, workers, concurrency, durability, observe):
                time.sleep(1.0)  # let the processes import and connect
                return _enqueue_and_wait(retrier, n, fn)
        finally:
            retrier.close()


def _enqueue_and_wait(retrier: Retrier, n: int, fn: str) -> float:
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{n} runs", total=n)
        start = time.perf_counter()
        cpu = time.process_time()
        ids = []
        for i in range(n):
            ids.append(retrier.run(fn))
            if i % 500 == 0:
                progress.update(task, completed=i)
        progress.update(task, description="waiting for completion", completed=n)
        wait_completed(retrier, len(ids), timeout=600)
        rate = n / (time.perf_counter() - start)
        # CPU of this process (all of it with an in-process worker): steadier than
        # wall time on a machine that is busy with something else.
        console.print(f"  cpu of this process: {(time.process_time() - cpu) / n * 1e6:,.0f} us/run")
        return rate


def wait_completed(retrier: Retrier, n: int, timeout: float) -> None:
    """Block until `n` runs have completed, counting them every 5 ms.

    The database is fresh, so every completed run is one of ours. `wait_all` would be
    as correct, but backs off to 50 ms pauses when another process does the work.
    """
    count = text("SELECT count(*) FROM tiers_runs WHERE state = 'completed'")
    deadline = time.monotonic() + timeout
    while True:
        with retrier.store.dialect.read() as conn:  # a deferred (read-only) transaction
            done = conn.execute(count).scalar_one()
        if done >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done} of {n} runs completed after {timeout:.0f} s")
        time.sleep(COMPLETION_POLL_S)


def backoff_lateness(kind: str, samples: int, durability: str = "normal") -> tuple[float, float]:
    """p50 and p95 lateness (ms) of a 250 ms backoff, with an in-process worker.

    Measured inside the action, so it includes everything a user would see: recording
    the failure, the timer firing, the claim and the dispatch of attempt 2.
    """
    with fresh_database(kind) as url:
        retrier = Retrier(url, initial_backoff_ms=250, durability=durability)
        seen: dict[int, list[float]] = {}

        @retrier.action(name="fails_once")
        def fails_once(key: int) -> None:
            now = time.perf_counter()
            if key not in seen:
                seen[key] = [now]
                raise RuntimeError("first attempt fails")
            seen[key].append(now)

        try:
            with retrier:
                ids = []
                for key in range(samples):
                    ids.append(retrier.run(fails_once, {"key": key}))
                    time.sleep(0.037)  # spread the due times out
                retrier.wait_all(ids, timeout=120)
        finally:
            retrier.close()
    late = sorted((second - first - 0.250) * 1000 for first, second in seen.values())
    return statistics.median(late), late[max(0, round(len(late) * 0.95) - 1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fn", choices=["noop", "noop_sync"], default="noop")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--sample", type=float, default=1.0,
                        help="with --observe: the ratio of traces sampled (env TIERS_BENCH_SAMPLE)")
    parser.add_argument("--observe", action="store_true",
                        help="metrics and tracing on (an SDK tracer that drops its spans)")
    parser.add_argument("--durability", choices=DURABILITIES, default="normal")
    args = parser.parse_args(argv)
    os.environ["TIERS_BENCH_SAMPLE"] = str(args.sample)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]

    title = f"{args.n} no-op runs" + (", metrics and tracing on" if args.observe else "")
    table = Table("database", "workers", "action", "runs/s", title=title)
    late = Table("database", "p50 ms", "p95 ms", title="lateness of a 250 ms backoff")
    for kind in kinds:
        for workers in args.workers:
            rate = throughput(kind, args.n, workers, args.fn, args.concurrency,
                              args.durability, observe=args.observe)
            where = "in-process" if workers == 0 else f"{workers} process(es)"
            table.add_row(kind, where, args.fn, f"{rate:,.0f}")
            console.print(f"{kind} {where}: {rate:,.0f} runs/s")
        p50, p95 = backoff_lateness(kind, args.samples, args.durability)
        late.add_row(kind, f"{p50:.1f}", f"{p95:.1f}")
    out = Console()
    out.print(table)
    out.print(late)


if __name__ == "__main__":
    main()
