"""Cost of a pool's claim as its pending backlog grows, for each item order.

    python -m bench.fair_claims                               # SQLite and PostgreSQL
    python -m bench.fair_claims --db sqlite --sizes 10000 100000 --rounds 2

A pool of 16 holds a backlog of pending items (5 priorities, 1,000 keys, due over the
last minute); we time claim(16) + record(16) pairs, with the pool ordering its items
in due order, by priority with aging, with keys taking turns, or with per-key caps
(`max_per_key=2`, 100 keys with caps of their own), or by priority in a pool group
(`group`: cap 24, guaranteed 8, beside two idle members guaranteed 8 each, whose
due items the claim counts, so it counts the group's whole budget: compare with
`priority`). Flat figures across sizes mean
indexes, not scans, do the work. Orders alternate within each round: the machine is
shared, so compare figures of one round.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from sqlalchemy import insert

from bench.throughput import fresh_database
from retrier import Retrier
from retrier._tables import new_row, runs
from retrier.engine import Outcome
from workpool import PoolGroup, Workpool

ORDERS = ("due", "priority", "round_robin", "key_limits", "group")


def make_pool(retrier: Retrier, order: str) -> Workpool:
    if order == "group":
        PoolGroup(retrier, "fair_gpu", max_parallelism=24)
        for idle in ("fair_idle_a", "fair_idle_b"):
            Workpool(retrier, idle, max_parallelism=8, group="fair_gpu", guaranteed=8)
    pool = Workpool(
        retrier,
        f"fair_{order}",
        max_parallelism=16,
        priority_aging=None if order == "due" else 30.0,
        round_robin_keys=order == "round_robin",
        max_per_key=2 if order == "key_limits" else None,
        group="fair_gpu" if order == "group" else None,
        guaranteed=8 if order == "group" else 0,
    )
    if order == "key_limits":
        for tenant in range(0, 1000, 10):
            pool.set_key_limit(f"t{tenant}", max_parallelism=3)
    return pool


def fill(retrier: Retrier, pool: Workpool, total: int) -> None:
    now = retrier.clock.now_ms()
    chunk = 5000
    for start in range(0, total, chunk):
        rows = []
        for i in range(start, min(total, start + chunk)):
            new = retrier.prepare(
                "noop", {}, queue=pool.name, key=f"t{i % 1000}", priority=i % 5,
                due_ms=now - 60_000 + (i * 60_000) // total,
            )
            rows.append(new_row(new, now))
        with retrier.store.dialect.write() as conn:
            conn.execute(insert(runs), rows)


def time_claims(retrier: Retrier, pairs: int) -> float:
    store = retrier.store
    claim_ms = []
    for _ in range(pairs):
        t = time.perf_counter()
        claimed, _ = store.claim("bench", 16, 30_000)
        claim_ms.append((time.perf_counter() - t) * 1000)
        store.record(
            [Outcome(c.id, c.fence, "success", c.started_ms, attempt=c.attempts, queue=c.queue)
             for c in claimed],
            "bench",
            30_000,
        )
    return statistics.median(claim_ms)


def measure(kind: str, order: str, size: int, pairs: int) -> float:
    with fresh_database(kind) as url:
        retrier = Retrier(url)
        try:
            retrier.action(name="noop")(_noop)
            pool = make_pool(retrier, order)
            fill(retrier, pool, size)
            return time_claims(retrier, pairs)
        finally:
            retrier.close()


def _noop() -> None: ...


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=60)
    args: Any = parser.parse_args(argv)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    print(f"median claim(16) ms, pool backlog of pending items; {args.rounds} rounds")
    print(f"{'round':>5} {'db':<11}{'order':<12}" + "".join(f"{s:>10,}" for s in args.sizes))
    for round_ in range(1, args.rounds + 1):
        for kind in kinds:
            for order in args.orders:
                cells = [measure(kind, order, size, args.pairs) for size in args.sizes]
                print(f"{round_:>5} {kind:<11}{order:<12}"
                      + "".join(f"{c:>10.2f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
