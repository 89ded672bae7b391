"""Cost of a claim (and of recording its outcomes) as stored runs grow: 10k → 1M.

    python -m bench.claim_scaling                       # SQLite and PostgreSQL
    python -m bench.claim_scaling --db sqlite --sizes 10000 100000 1000000
    python -m bench.claim_scaling --db postgresql --sizes 0 --backlog 1000 20000 100000

The table is filled with completed runs (the bulk of a real database, kept for the
7-day retention) plus a backlog of pending ones; we then time claim(16) + record(16)
pairs. Flat figures mean the indexes, not table scans, do the work. `--backlog` sets
how many pending runs wait (2,000 unless told; several sizes make several rows): the
claims take the first 16 due of them, so their cost should not grow with it either.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import insert

from bench.apps import build
from bench.throughput import fresh_database
from retrier._tables import runs
from retrier.engine import Outcome, new_id

console = Console(stderr=True)
BACKLOG = 2000


def fill(retrier: Any, total: int, progress: Progress) -> None:
    """Insert `total` completed runs in chunks, as fast as the database allows (with
    ids as the library makes them)."""
    now = retrier.clock.now_ms()
    task = progress.add_task(f"filling {total:,} completed runs", total=total)
    chunk = 5000
    for start in range(0, total, chunk):
        rows = [
            {
                "id": new_id(), "fn": "noop", "args": {}, "state": "completed",
                "outcome": "success", "attempts": 1, "failures": 0, "due_ms": 0, "priority": 0,
                "queue": "", "fence": 1, "cancel_requested": False, "initial_backoff_ms": 250,
                "base": 2.0, "max_failures": 4, "jitter": False, "max_backoff_ms": 3_600_000,
                "handler_failures": 0, "created_ms": now - 1000, "finished_ms": now - 500,
            }
            for _ in range(min(chunk, total - start))
        ]
        with retrier.store.dialect.write() as conn:
            conn.execute(insert(runs), rows)
        progress.update(task, advance=len(rows))


def time_claims(retrier: Any, backlog: int, pairs: int = 100) -> tuple[float, float]:
    store = retrier.store
    with retrier.session() as session:
        for _ in range(backlog):
            retrier.run("noop", session=session)
        session.commit()
    claim_ms, record_ms = [], []
    for _ in range(pairs):
        t = time.perf_counter()
        claimed, _ = store.claim("bench", 16, 30_000)
        claim_ms.append((time.perf_counter() - t) * 1000)
        outcomes = [Outcome(c.id, c.fence, "success", c.started_ms) for c in claimed]
        t = time.perf_counter()
        store.record(outcomes, "bench", 30_000)
        record_ms.append((time.perf_counter() - t) * 1000)
    return statistics.median(claim_ms), statistics.median(record_ms)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--backlog", type=int, nargs="+", default=[BACKLOG],
                        help="pending runs waiting to be claimed")
    args = parser.parse_args(argv)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    table = Table("database", "stored runs", "backlog", "claim(16) ms", "record(16) ms",
                  title="median cost per batch of 16")
    for kind in kinds:
        for size, backlog in itertools.product(args.sizes, args.backlog):
            with fresh_database(kind) as url:
                retrier = build(url)
                try:
                    with Progress(console=console, transient=True) as progress:
                        fill(retrier, size, progress)
                    if kind == "postgresql":
                        with retrier.engine.connect() as conn:
                            conn.exec_driver_sql("ANALYZE tiers_runs")
                            conn.commit()
                    claim, record = time_claims(retrier, backlog)
                finally:
                    retrier.close()
            table.add_row(kind, f"{size:,}", f"{backlog:,}", f"{claim:.2f}", f"{record:.2f}")
            console.print(f"{kind} {size:,} stored, {backlog:,} pending: claim {claim:.2f} ms,"
                          f" record {record:.2f} ms")
    Console().print(table)


if __name__ == "__main__":
    main()
