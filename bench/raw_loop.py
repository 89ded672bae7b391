"""The distance to the limit: a raw-SQL job loop against durable-tiers on the same load.

    python -m bench.raw_loop                          # SQLite and PostgreSQL, n=2000
    python -m bench.raw_loop --db sqlite --full       # adds SQLite synchronous=FULL
    python -m bench.raw_loop --db postgresql --connections 10 --n 5000
    python -m bench.raw_loop --json                   # also one JSON line on stdout
    python -m bench.raw_loop --db sqlite --rounds 5   # medians of 5 alternating rounds

The raw loop uses the drivers directly (sqlite3, psycopg), no durable-tiers code, on a
table shaped like `tiers_runs` (text id, name, args json, state, due_ms, attempts,
lease_owner, lease_until_ms, created/started/finished_ms; a partial index on the
pending runs' due_ms). Per job it does what any durable queue must:

1. INSERT a pending row (its own commit: an enqueue);
2. claim it: UPDATE ... SET state='running', attempts+1, lease ... WHERE id = (SELECT
   the first due pending row [FOR UPDATE SKIP LOCKED on PostgreSQL]) RETURNING ...;
3. UPDATE it to completed (guarded by the lease owner).

Modes:

- SQLite serial: one connection, 3 commits per job, WAL, synchronous NORMAL (and FULL
  with `--full`);
- SQLite batched: enqueues still commit one by one, but claims and completions take 100
  jobs per transaction (1.02 commits per job): the best a batching worker can do;
- PostgreSQL: `--connections` (default 10) threads, each with its own connections and
  the same 3-commit loop, at three settings: synchronous_commit on for everything
  (paired with durable-tiers' "full"); on for the enqueue and off for the claim and
  the completion, exactly what durable-tiers' "normal" (its default) does, so the
  pair at equal durability; and off for everything, the enqueue too, shown beside
  (it flatters the raw loop: its enqueues do not wait for the disk, ours do). Each
  thread enqueues on one connection and claims and completes on another, each set
  to its synchronous_commit once.

Then durable-tiers runs the same load: n no-op runs enqueued one `retrier.run()` at a
time while one worker (`--tiers-workers 1`: a `python -m retrier worker` process;
0: in-process, `with retrier:`) with concurrency 10 executes them, at the matching
durability (SQLite NORMAL / PostgreSQL off -> durability="normal"; FULL / on ->
"full"). Its runs/s come from bench.throughput. The ratio printed is durable-tiers'
runs/s over the raw serial loop's jobs/s at the same durability (and, for SQLite,
over the batched loop's). The raw loop does no retries, no timers, no attempt
history, no wake-ups: it is a ceiling, not a peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from bench.compare import shown
from bench.throughput import PG_URL, throughput

LIBPQ = PG_URL.replace("postgresql+psycopg://", "postgresql://")
console = Console(stderr=True)

SQLITE_DDL = [
    """CREATE TABLE raw_jobs (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, args TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending', due_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until_ms INTEGER,
        created_ms INTEGER NOT NULL, started_ms INTEGER, finished_ms INTEGER)""",
    "CREATE INDEX raw_jobs_due ON raw_jobs (due_ms) WHERE state = 'pending'",
]
PG_DDL = [
    """CREATE TABLE raw_jobs (
        id VARCHAR(40) PRIMARY KEY, name VARCHAR(200) NOT NULL, args JSONB NOT NULL,
        state VARCHAR(16) NOT NULL DEFAULT 'pending', due_ms BIGINT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, lease_owner VARCHAR(120),
        lease_until_ms BIGINT, created_ms BIGINT NOT NULL, started_ms BIGINT,
        finished_ms BIGINT)""",
    "CREATE INDEX raw_jobs_due ON raw_jobs (due_ms) WHERE state = 'pending'",
]
INSERT = ("INSERT INTO raw_jobs (id, name, args, due_ms, created_ms) "
          "VALUES ({p}, 'noop', {p}, {p}, {p})")
CLAIM = """UPDATE raw_jobs SET state = 'running', attempts = attempts + 1,
    lease_owner = {p}, lease_until_ms = {p}, started_ms = {p}
    WHERE id IN (SELECT id FROM raw_jobs WHERE state = 'pending' AND due_ms <= {p}
                 ORDER BY due_ms LIMIT {p}{lock})
    RETURNING id, name, args"""
COMPLETE = ("UPDATE raw_jobs SET state = 'completed', finished_ms = {p}, lease_owner = NULL, "
            "lease_until_ms = NULL WHERE id = {p} AND lease_owner = {p}")
LEASE_MS = 30_000


def now_ms() -> int:
    return int(time.time() * 1000)


# -- SQLite ------------------------------------------------------------------------------

def sqlite_conn(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def sqlite_loop(n: int, synchronous: str, batch: int) -> dict[str, Any]:
    """n jobs on one connection; claims and completions `batch` at a time."""
    insert, claim = INSERT.format(p="?"), CLAIM.format(p="?", lock="")
    complete = COMPLETE.format(p="?")
    owner = f"raw-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite_conn(Path(tmp) / "raw.db", synchronous)
        for ddl in SQLITE_DDL:
            conn.execute(ddl)
        commits = 0
        start = time.perf_counter()
        done = 0
        while done < n:
            size = min(batch, n - done)
            for i in range(size):
                conn.execute("BEGIN")
                t = now_ms()
                conn.execute(insert, (uuid.uuid4().hex, json.dumps({"i": done + i}), t, t))
                conn.execute("COMMIT")
            conn.execute("BEGIN IMMEDIATE")
            t = now_ms()
            claimed = conn.execute(claim, (owner, t + LEASE_MS, t, t, size)).fetchall()
            conn.execute("COMMIT")
            for _id, _name, args in claimed:
                json.loads(args)  # what a worker would do before calling the action
            conn.execute("BEGIN IMMEDIATE")
            t = now_ms()
            conn.executemany(complete, [(t, row[0], owner) for row in claimed])
            conn.execute("COMMIT")
            commits += size + 2
            done += len(claimed)
        elapsed = time.perf_counter() - start
        left = conn.execute("SELECT count(*) FROM raw_jobs WHERE state != 'completed'").fetchone()
        conn.close()
    assert left[0] == 0, left
    return {"jobs_per_s": n / elapsed, "commits_per_job": commits / n}


# -- PostgreSQL --------------------------------------------------------------------------

def pg_loop(n: int, connections: int, enqueue_sync: str, work_sync: str) -> dict[str, Any]:
    """n jobs over `connections` threads, 3 commits/job: each thread enqueues on a
    connection with synchronous_commit `enqueue_sync`, claims and completes on one with
    `work_sync`."""
    import psycopg

    insert, complete = INSERT.format(p="%s"), COMPLETE.format(p="%s")
    claim = CLAIM.format(p="%s", lock=" FOR UPDATE SKIP LOCKED")
    schema = f"raw_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(LIBPQ, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        admin.execute(f"SET search_path = {schema}")
        for ddl in PG_DDL:
            admin.execute(ddl)
    try:
        def connect(synchronous_commit: str) -> psycopg.Connection[Any]:
            conn = psycopg.connect(LIBPQ, autocommit=True)
            conn.execute(f"SET search_path = {schema}")
            conn.execute(f"SET synchronous_commit = {synchronous_commit}")
            return conn

        pairs = [(connect(enqueue_sync), connect(work_sync)) for _ in range(connections)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(connections + 1)
        lock = threading.Lock()
        tally = {"inserted": 0, "completed": 0}

        def take(key: str) -> bool:
            with lock:
                if tally[key] >= n:
                    return False
                tally[key] += 1
                return True

        def loop(enqueues: psycopg.Connection[Any], conn: psycopg.Connection[Any],
                 k: int) -> None:
            owner = f"raw-{os.getpid()}-{k}"
            barrier.wait()
            try:
                while tally["completed"] < n:
                    if take("inserted"):
                        t = now_ms()
                        enqueues.execute(insert, (uuid.uuid4().hex, json.dumps({"k": k}), t, t))
                    t = now_ms()
                    rows = conn.execute(claim, (owner, t + LEASE_MS, t, t, 1)).fetchall()
                    for row in rows:  # any due job, not necessarily this thread's
                        conn.execute(complete, (now_ms(), row[0], owner))
                        with lock:
                            tally["completed"] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(*pair, k))
                   for k, pair in enumerate(pairs)]
        for th in threads:
            th.start()
        barrier.wait()
        start = time.perf_counter()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        left = pairs[0][1].execute("SELECT count(*) FROM raw_jobs WHERE state != 'completed'"
                                   ).fetchone()
        assert left is not None and left[0] == 0, left
        for pair in pairs:
            for conn in pair:
                conn.close()
    finally:
        with psycopg.connect(LIBPQ, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
    return {"jobs_per_s": n / elapsed, "commits_per_job": 3.0}


# (enqueue's synchronous_commit, the claim's and completion's, durable-tiers' durability
# at the same setting, as the table shows it). The last flatters the raw loop.
PG_SETTINGS = [
    ("on", "on", "full", "synchronous_commit=on"),
    ("on", "off", "normal", "enqueue on, claim/complete off"),
    ("off", "off", "normal", "synchronous_commit=off (all)"),
]


# -- main --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--n", type=int, default=2000, help="jobs per measurement")
    parser.add_argument("--full", action="store_true",
                        help="SQLite: also measure synchronous=FULL (durability='full')")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--tiers-workers", type=int, default=1,
                        help="durable-tiers worker processes (0: in-process)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each loop this many times, alternating; medians")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]

    rows: list[dict[str, Any]] = []

    def tiers(kind: str, durability: str) -> float:
        console.print(f"durable-tiers {kind} durability={durability} ...")
        return throughput(kind, args.n, args.tiers_workers, "noop", args.concurrency,
                          durability)

    # Each round measures every loop once, in turn (the machine's drift hits all of
    # them); the table shows medians and the ratio of medians.
    for kind in kinds:
        if kind == "sqlite":
            for sync, durability in [("NORMAL", "normal")] + ([("FULL", "full")] if args.full
                                                              else []):
                serial, batched, ours = [], [], []
                commits = 0.0
                for _ in range(args.rounds):
                    console.print(f"raw SQLite synchronous={sync} ...")
                    serial.append(sqlite_loop(args.n, sync, 1)["jobs_per_s"])
                    both = sqlite_loop(args.n, sync, args.batch)
                    batched.append(both["jobs_per_s"])
                    commits = both["commits_per_job"]
                    ours.append(tiers(kind, durability))
                rows.append({"db": kind, "setting": f"synchronous={sync}",
                             "durability": durability, "raw_serial_rounds": serial,
                             "raw_batched_rounds": batched, "tiers_rounds": ours,
                             "batched_commits_per_job": commits})
        else:
            raws: dict[str, list[float]] = {s[3]: [] for s in PG_SETTINGS}
            measured: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for enqueue_sync, work_sync, durability, setting in PG_SETTINGS:
                    console.print(f"raw PostgreSQL {setting} ...")
                    raws[setting].append(
                        pg_loop(args.n, args.connections, enqueue_sync, work_sync)["jobs_per_s"]
                    )
                    if len(measured.get(durability, [])) < len(raws[setting]):
                        # ours once per durability and round
                        measured.setdefault(durability, []).append(tiers(kind, durability))
            for _, _, durability, setting in PG_SETTINGS:
                rows.append({"db": kind, "setting": setting, "durability": durability,
                             "raw_serial_rounds": raws[setting], "raw_batched_rounds": None,
                             "tiers_rounds": measured[durability]})
    for r in rows:
        r["raw_serial"] = statistics.median(r["raw_serial_rounds"])
        r["raw_batched"] = (statistics.median(r["raw_batched_rounds"])
                            if r["raw_batched_rounds"] else None)
        r["tiers"] = statistics.median(r["tiers_rounds"])

    where = ("in-process worker" if args.tiers_workers == 0
             else f"{args.tiers_workers} worker process(es)")
    table = Table("database", Column("setting", no_wrap=True), "durability", "raw jobs/s",
                  f"raw batched {args.batch}", "tiers runs/s", "tiers / raw", "/ batched",
                  title=(f"{args.n} no-op jobs, median of {args.rounds} round(s) (min-max): "
                         f"raw SQL loop vs durable-tiers ({where}, "
                         f"concurrency {args.concurrency}); PostgreSQL raw loop on "
                         f"{args.connections} connections"))
    for r in rows:
        r["pct_of_raw"] = 100 * r["tiers"] / r["raw_serial"]
        r["pct_of_batched"] = 100 * r["tiers"] / r["raw_batched"] if r["raw_batched"] else None
        table.add_row(
            r["db"], r["setting"], r["durability"],
            shown(r["raw_serial_rounds"]),
            shown(r["raw_batched_rounds"]) if r["raw_batched"] else "-",
            shown(r["tiers_rounds"]), f"{r['pct_of_raw']:.0f}%",
            f"{r['pct_of_batched']:.0f}%" if r["pct_of_batched"] else "-")
    out = Console(width=max(Console().width, 110))
    out.print(table)
    out.print("raw: 3 commits/job; raw batched: 1 commit per enqueue, claims and completions "
              f"{args.batch} per transaction; tiers: durable-tiers. Noisy machine: compare "
              "ratios within one run.")
    for r in rows:
        out.print(f"{r['db']} ({r['setting']}): durable-tiers = {r['pct_of_raw']:.0f}% of the "
                  "raw loop" + (f", {r['pct_of_batched']:.0f}% of the batched raw loop"
                                if r["pct_of_batched"] else ""))
    if args.json:
        print(json.dumps({"bench": "raw_loop", "n": args.n, "connections": args.connections,
                          "tiers_workers": args.tiers_workers,
                          "concurrency": args.concurrency, "rows": rows}))


if __name__ == "__main__":
    main()
