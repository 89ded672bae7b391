"""The app the benchmark's worker processes run: one pool of 10, two actions."""

from __future__ import annotations

import os
import time

from retrier import Retrier
from workpool import PoolGroup, Workpool

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
# BENCH_ORDER: how the pool orders its items (bench.workpool --orders): due order,
# priority with aging (the default), keys taking turns, keys with caps of their own, or
# priority with aging in a pool group (see bench.workpool's docstring).
_order = os.environ.get("BENCH_ORDER", "priority")
if _order == "group":
    PoolGroup(retrier, "bench_group", max_parallelism=18)
    for _idle in ("bench_idle_a", "bench_idle_b"):  # guaranteed 4 each, no items: lent
        Workpool(retrier, _idle, max_parallelism=4, group="bench_group", guaranteed=4)
pool = Workpool(
    retrier,
    "bench",
    max_parallelism=10,
    max_per_worker=int(_per_worker) if _per_worker else None,
    priority_aging=None if _order == "due" else 60.0,
    round_robin_keys=_order == "round_robin",
    max_per_key=5 if _order == "key_limits" else None,
    group="bench_group" if _order == "group" else None,
    guaranteed=4 if _order == "group" else 0,
)
if _order == "key_limits":
    for _tenant in range(0, 50, 5):
        pool.set_key_limit(f"t{_tenant}", max_parallelism=8)
