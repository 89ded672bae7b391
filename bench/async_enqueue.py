"""Enqueues from many tasks of one event loop, as an async web app's requests make
them: `retrier.run_async`'s enqueues/s and the CPU they cost, no worker running.

    python -m bench.async_enqueue                          # SQLite and PostgreSQL, full
    python -m bench.async_enqueue --db sqlite --durability normal --tasks 1 50

Each of `--tasks` tasks enqueues its share of `--n` runs one after another; with one
task the enqueues are sequential, with many they overlap and may share commits.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

from bench.throughput import DURABILITIES, fresh_database
from retrier import Retrier


async def _enqueue(retrier: Retrier, n: int, tasks: int) -> float:
    async def one_task(count: int) -> None:
        for i in range(count):
            await retrier.run_async("noop", {"i": i})

    began = time.perf_counter()
    await asyncio.gather(*(one_task(n // tasks) for _ in range(tasks)))
    return time.perf_counter() - began


def measure(kind: str, durability: str, n: int, tasks: int) -> tuple[float, float]:
    """(enqueues/s, ms of CPU per enqueue) for `n` enqueues from `tasks` tasks."""
    with fresh_database(kind) as url:
        retrier = Retrier(url, durability=durability)  # type: ignore[arg-type]
        try:

            @retrier.action(name="noop")
            async def noop(i: int) -> int:
                return i

            asyncio.run(_enqueue(retrier, 200, min(tasks, 200)))  # warm up
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_before = usage.ru_utime + usage.ru_stime
            elapsed = asyncio.run(_enqueue(retrier, n, tasks))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = usage.ru_utime + usage.ru_stime - cpu_before
        finally:
            retrier.close()
    done = n // tasks * tasks
    return done / elapsed, cpu * 1000 / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--durability", choices=DURABILITIES, default="full")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 50])
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for kind in kinds:
        for tasks in args.tasks:
            rate, cpu_ms = measure(kind, args.durability, args.n, tasks)
            print(f"{kind} ({args.durability}), {tasks} task(s): {rate:,.0f} enqueues/s, "
                  f"{cpu_ms:.3f} ms of CPU each")


if __name__ == "__main__":
    main()
