"""The app the benchmark's worker processes run: one pool of 10, two actions."""

from __future__ import annotations

import os
import time

from retrier import Retrier
from workpool import Workpool

retrier = Retrier(os.environ["BENCH_DB_URL"])


@retrier.action(name="noop")
def noop(i: int) -> None:
    """Does nothing: the benchmark measures the pool and the engine."""


@retrier.action(name="burn")
def burn(i: int, ms: float) -> None:
    """Keeps the CPU busy for `ms` milliseconds, as a CPU-bound action would."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


# BENCH_MAX_PER_WORKER spreads the pool over the worker processes (see docs/workpool.md).
_per_worker = os.environ.get("BENCH_MAX_PER_WORKER")
pool = Workpool(
    retrier, "bench", max_parallelism=10, max_per_worker=int(_per_worker) if _per_worker else None
)
