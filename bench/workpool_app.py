"""The app the benchmark's worker processes run: one no-op action, one pool of 10."""

from __future__ import annotations

import os

from retrier import Retrier
from workpool import Workpool

retrier = Retrier(os.environ["BENCH_DB_URL"])


@retrier.action(name="noop")
def noop(i: int) -> None:
    """Does nothing: the benchmark measures the pool and the engine."""


pool = Workpool(retrier, "bench", max_parallelism=10)
