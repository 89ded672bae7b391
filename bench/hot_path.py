"""What one run costs on each side of the queue: the producer alone, the worker alone.

    python -m bench.hot_path                          # SQLite and PostgreSQL, n=4000
    python -m bench.hot_path --db sqlite --durability full normal --fn noop_sync noop

Two measurements per database and durability, each in this process with nothing else
running, so the figures are the cost of our own code and driver calls, not of
contention:

- enqueue: `retrier.run(fn)` n times, one transaction each, no worker running;
- drain: the same n runs already stored, one in-process worker (concurrency 10)
  executes them all (`run_until_idle`); no producer running.

Each prints runs/s (wall) and CPU microseconds per run of this process (for the
PostgreSQL rows the server's CPU is not included). bench.throughput measures the two
sides together, end to end, as the peers are measured.

CPU time on a shared 2-core machine strays by 20% and more from run to run; counted
instructions do not. To compare two versions of the enqueue, count them with
valgrind at two sizes and divide the difference (start-up cancels out):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python -m bench.hot_path --db sqlite --durability normal --no-drain --n 200
    # ... again with --n 2200; instructions per enqueue = (I_2200 - I_200) / 2000
"""

from __future__ import annotations

import argparse
import json
import time

import anyio
from rich.console import Console
from rich.table import Table

from bench.apps import build
from bench.throughput import DURABILITIES, fresh_database

console = Console(stderr=True)


def _timed(fn: object) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start, time.process_time() - cpu


def measure(kind: str, n: int, durability: str, fn: str, drain: bool = True
            ) -> dict[str, float]:
    with fresh_database(kind) as url:
        retrier = build(url, concurrency=10, durability=durability)
        try:
            for _ in range(50):  # warm up: connections, compiled statements
                retrier.run(fn)
            if drain:
                anyio.run(retrier.worker().run_until_idle)
            wall_e, cpu_e = _timed(lambda: [retrier.run(fn) for _ in range(n)])
            row = {"enqueue_per_s": n / wall_e, "enqueue_cpu_us": cpu_e / n * 1e6}
            if drain:
                worker = retrier.worker()
                wall_d, cpu_d = _timed(lambda: anyio.run(worker.run_until_idle))
                row.update(drain_per_s=n / wall_d, drain_cpu_us=cpu_d / n * 1e6)
        finally:
            retrier.close()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    parser.add_argument("--durability", nargs="+", default=list(DURABILITIES),
                        choices=DURABILITIES)
    parser.add_argument("--fn", nargs="+", default=["noop_sync"], choices=["noop_sync", "noop"])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--no-drain", action="store_true",
                        help="the enqueue alone (no worker started): for counting instructions")
    parser.add_argument("--json", action="store_true", help="also one JSON line per row")
    args = parser.parse_args(argv)
    table = Table(title=f"one run's cost, producer alone and worker alone (n={args.n})")
    for column in ("database", "durability", "action", "enqueue runs/s", "enqueue CPU µs",
                   "drain runs/s", "drain CPU µs"):
        table.add_column(column, justify="right")
    for kind in args.db:
        for durability in args.durability:
            for fn in args.fn:
                row = measure(kind, args.n, durability, fn, drain=not args.no_drain)
                table.add_row(kind, durability, fn, f"{row['enqueue_per_s']:,.0f}",
                              f"{row['enqueue_cpu_us']:,.0f}",
                              f"{row['drain_per_s']:,.0f}" if "drain_per_s" in row else "-",
                              f"{row['drain_cpu_us']:,.0f}" if "drain_cpu_us" in row else "-")
                if args.json:
                    print(json.dumps({"db": kind, "durability": durability, "fn": fn, **row}))
    console.print(table)


if __name__ == "__main__":
    main()
