"""Workpool throughput and latency: 10,000 no-op items through a pool of 10.

    python -m bench.workpool                 # SQLite and PostgreSQL, 1 and 4 workers
    python -m bench.workpool --db sqlite --workers 1 --items 2000 --cpu-items 0
    python -m bench.workpool --orders due priority round_robin key_limits --rounds 3
    python -m bench.workpool --orders priority group --rounds 3 --workers 1 4

`--orders` compares how the pool orders its items, on the same items (5 priorities,
50 keys), in alternating rounds (the machine is shared: compare within a round):
`due` (priority_aging=None, the order before priorities), `priority` (the default:
priority with aging), `round_robin` (round_robin_keys=True), `key_limits`
(max_per_key=5 and 10 keys with caps of their own of 8), `group` (`priority`, in a
pool group of 18 with two idle members guaranteed 4 each: the pool borrows their
slots, and every claim counts the group's budget).

Workers are real processes (`python -m retrier worker bench.workpool_app:pool`).
Two measurements per configuration of the no-op table:

- backlog: all items enqueued in one `enqueue_batch`, then workers start; items/s is
  items divided by the time from the first start to the last completion, read from
  the engine's stamps (so process start-up is not counted);
- trickle: with the workers idle and warm, items enqueued one by one at a steady
  rate well below capacity; enqueue -> start latency (started_ms - created_ms) p50/p95.
  (In a backlog the latency is just queueing time, which says nothing.)

On PostgreSQL the backlog's row also shows pg_stat_database's commits per item and the
transactions per item that wrote (the server's transaction ids), counted from the
workers' start to the last completion (`bench.pg_scaling.xacts`; this process's
completion polls roll back, so they are not commits): as workers are added, both
should stay about the same.

No-op items measure the engine: each worker's record-and-claim transaction costs about
the same for 2 items as for 10, so the pool goes fastest when one process holds all of
its slots. The CPU-bound table measures what more processes are for: actions whose
own CPU time, held to one core per process by the GIL, is the bottleneck. It runs
workers at the default concurrency (the first worker takes all ten slots) and at
`--concurrency 1` (the slots, and the work, spread over the processes).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("TIERS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def fresh_db(kind: str, tmp: Path) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:6]}.db'}", None
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{PG}?options=-csearch_path%3D{schema}", schema


def drop_db(schema: str | None) -> None:
    if schema is None:
        return
    import psycopg

    with psycopg.connect(PG.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def completed(engine, n_expected: int) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(
            text("SELECT count(*) FROM tiers_runs WHERE state = 'completed'")).scalar() or 0)


def start_workers(url: str, n: int, concurrency: int | None) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "BENCH_DB_URL": url, "TIERS_LOG_LEVEL": "ERROR"}
    cmd = [sys.executable, "-m", "retrier", "worker", "bench.workpool_app:pool"]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL) for _ in range(n)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def run(
    kind: str, workers: int, items: int, trickle: int, cpu_ms: float = 0.0,
    concurrency: int | None = None, max_per_worker: int | None = None,
    order: str | None = None,
) -> dict[str, float]:
    os.environ["BENCH_DB_URL"] = "sqlite:///unused.db"
    os.environ["BENCH_ORDER"] = order or "priority"
    mixed = order is not None  # items with priorities and keys
    # The pool's settings: this process and the workers build the same pool.
    os.environ.pop("BENCH_MAX_PER_WORKER", None)
    if max_per_worker:
        os.environ["BENCH_MAX_PER_WORKER"] = str(max_per_worker)
    with tempfile.TemporaryDirectory() as tmp:
        url, schema = fresh_db(kind, Path(tmp))
        try:
            os.environ["BENCH_DB_URL"] = url
            sys.path.insert(0, str(ROOT))
            import importlib

            import bench.workpool_app as app

            app = importlib.reload(app)
            t = time.perf_counter()
            if cpu_ms:
                app.pool.enqueue_batch([("burn", {"i": i, "ms": cpu_ms}) for i in range(items)])
            elif mixed:
                app.pool.enqueue_batch([
                    ("noop", {"i": i}, {"priority": i % 5, "key": f"t{i % 50}"})
                    for i in range(items)
                ])
            else:
                app.pool.enqueue_batch([("noop", {"i": i}) for i in range(items)])
            enqueue_s = time.perf_counter() - t
            before = _xacts(kind)
            procs = start_workers(url, workers, concurrency)
            try:
                while completed(app.retrier.engine, items) < items:
                    time.sleep(0.05)
                after = _xacts(kind)
                with app.retrier.engine.connect() as conn:
                    first, last = conn.execute(text(
                        "SELECT min(a.started_ms), max(r.finished_ms) FROM tiers_runs r "
                        "JOIN tiers_attempts a ON a.run_id = r.id")).one()
                rate = items / max((last - first) / 1000, 1e-3)
                # trickle: idle, warm workers; one item every 5 ms
                ids: list[str] = []
                for i in range(trickle):
                    options = {"priority": i % 5, "key": f"t{i % 50}"} if mixed else {}
                    ids.append(app.pool.enqueue("noop", {"i": i}, **options))
                    time.sleep(0.005)
                while completed(app.retrier.engine, items + trickle) < items + trickle:
                    time.sleep(0.05)
                rows = app.retrier.store.get_many(ids).values()
                lat = [float(r.started_ms - r.created_ms) for r in rows if r.started_ms]
                lat = lat or [float("nan")]
            finally:
                stop(procs)
            app.retrier.close()
            return {"enqueue_s": enqueue_s, "items_per_s": rate,
                    "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
                    "commits_per_item": (after[0] - before[0]) / items,
                    "writing_per_item": (after[2] - before[2]) / items}
        finally:
            drop_db(schema)


def _xacts(kind: str) -> tuple[float, float, float]:
    """PostgreSQL's (commits, rollbacks, next transaction id) of the bench database;
    NaN on SQLite."""
    if kind == "sqlite":
        return (math.nan,) * 3
    from sqlalchemy.engine import make_url

    from bench.pg_scaling import xacts  # (it imports this module)

    return xacts(str(make_url(PG).database))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--trickle", type=int, default=300)
    parser.add_argument("--cpu-items", type=int, default=3_000,
                        help="items of the CPU-bound table (0: skip it)")
    parser.add_argument("--cpu-ms", type=float, default=2.0,
                        help="CPU time each item of the CPU-bound table burns")
    parser.add_argument("--orders", nargs="*", default=[],
                        choices=["due", "priority", "round_robin", "key_limits", "group"],
                        help="compare these item orders instead (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --orders")
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if args.orders:
        compare_orders(args, kinds)
        return
    print(f"{args.items} no-op items, pool of 10; latency from {args.trickle} trickled items")
    print(f"{'db':<11}{'workers':>8}{'enqueue s':>11}{'items/s':>10}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'commits/item':>14}{'writing/item':>14}")
    for kind in kinds:
        for n in args.workers:
            r = run(kind, n, args.items, args.trickle)
            print(f"{kind:<11}{n:>8}{r['enqueue_s']:>11.2f}{r['items_per_s']:>10.0f}"
                  f"{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}"
                  f"{r['commits_per_item']:>14.3f}{r['writing_per_item']:>14.3f}", flush=True)
    if not args.cpu_items:
        return
    print(f"\n{args.cpu_items} CPU-bound items ({args.cpu_ms:g} ms of CPU each), pool of 10")
    print(f"{'db':<11}{'workers':>8}  {'each worker holds':<22}{'items/s':>10}")
    for kind in kinds:
        for n, concurrency, per_worker in _CPU_CONFIGS:
            r = run(kind, n, args.cpu_items, 1, cpu_ms=args.cpu_ms, concurrency=concurrency,
                    max_per_worker=per_worker)
            shown = (
                f"--concurrency {concurrency}" if concurrency
                else f"max_per_worker={per_worker}" if per_worker
                else "up to 16 (default)"
            )
            print(f"{kind:<11}{n:>8}  {shown:<22}{r['items_per_s']:>10.0f}", flush=True)


def compare_orders(args: argparse.Namespace, kinds: list[str]) -> None:
    """Each order in turn, round after round, on the same mixed items."""
    print(f"{args.items} no-op items (5 priorities, 50 keys), pool of 10; "
          f"latency from {args.trickle} trickled items; {args.rounds} alternating rounds")
    print(f"{'round':>5} {'db':<11}{'workers':>8} {'order':<12}{'items/s':>9}"
          f"{'p50 ms':>9}{'p95 ms':>9}")
    for round_ in range(1, args.rounds + 1):
        for kind in kinds:
            for n in args.workers:
                for order in args.orders:
                    r = run(kind, n, args.items, args.trickle, order=order)
                    print(f"{round_:>5} {kind:<11}{n:>8} {order:<12}{r['items_per_s']:>9.0f}"
                          f"{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}", flush=True)


# The default concurrency (16) lets the first worker take every slot of the pool; with
# --concurrency 1, or the pool's max_per_worker=1, each process holds one, so the slots
# (and the CPU work) spread over the processes.
_CPU_CONFIGS: list[tuple[int, int | None, int | None]] = [
    (1, None, None), (4, None, None),
    (1, 1, None), (2, 1, None), (4, 1, None),
    (2, None, 1), (4, None, 1),
]


if __name__ == "__main__":
    main()
