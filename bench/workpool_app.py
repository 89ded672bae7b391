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


pool = Workpool(retrier, "bench", max_parallelism=10)
