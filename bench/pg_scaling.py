"""PostgreSQL scaling: runs/s, commits/run and rollbacks/run with 1, 2 and 4 workers.

    python -m bench.pg_scaling                         # pool and plain, 1 2 4 workers, 3 rounds
    python -m bench.pg_scaling --runs 5000 --workers 1 4 --mode pool --rounds 1
    python -m bench.pg_scaling --json                  # also one JSON line on stdout

Each round measures every worker count once, in alternating order (1 2 4, then 4 2 1),
so the machine's drift falls on all of them alike; the table shows the medians of the
rounds (runs/s with their min-max), and the verdict compares medians.

Workers are processes (`python -m retrier worker bench.workpool_app:pool`, default
settings: concurrency 16, durability normal). Two loads:

- pool: N no-op items in one `enqueue_batch` into the shared pool of 10
  (max_parallelism=10, bench.workpool_app);
- plain: N no-op retrier runs (`retrier.run(..., session=s)`, one transaction), no pool.

Order of a measurement: fresh schema; K workers start and register; after they have been
idle a moment, pg_stat_database (xact_commit, xact_rollback of the database, read from a
fresh connection to the `postgres` database, after pg_stat_clear_snapshot()) and each
worker's CPU time (/proc/PID/stat) are read; the backlog is enqueued; this process polls
for completion on one autocommit connection (those polls are counted and subtracted);
then the workers' CPU is read again, they stop (a backend flushes its statistics when it
exits) and pg_stat_database is read a second time. So commits/run counts the workers'
claims, records, heartbeats and idle polls over the window, plus the enqueue's
transaction and the workers' shutdown (a few commits in all, negligible over N). It also
counts one read-only transaction per notification per listening worker: a backend that
LISTENs reads each NOTIFY it is sent inside a transaction of its own (PostgreSQL's
async.c), so every wake-up a record sends shows up once per worker. "writing txns/run"
leaves those out: the growth of the server's next transaction id over the same window
(cluster-wide; ids go only to transactions that write or lock rows), the enqueue
included. Throughput is N over the time from the first attempt's start to the last run's
finish (engine stamps, no process start-up). CPU: the workers' CPU seconds over the
window per 1,000 runs of the backlog, summed over the workers and for the busiest one,
and each worker's seconds.

The backlog is 20,000 runs unless told: a drain of 5,000 took 0.6 s at 8,000 runs/s,
too short to tell workers apart from their start (each opens connections and plans
its statements under load), and a larger backlog is where a claim that grows with it
shows (before the claim's bitmap scans were switched off, 20,000 drained at
3,200 runs/s in its first second and 6,000 in its last).

The measurements use a database of their own (`tiers_bench_<pid>`, created and dropped
by this script), so that other clients of the server's databases do not show up in
pg_stat_database. Target: runs/s non-decreasing from 1 to 4 workers, commits/run about
constant.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from bench.workpool import PG, ROOT

LIBPQ = PG.replace("+psycopg", "")
BENCH_DB = f"tiers_bench_{os.getpid()}"
console = Console(stderr=True)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def in_db(url: str, datname: str) -> str:
    """`url` (libpq or SQLAlchemy) pointed at database `datname`."""
    return url.rsplit("/", 1)[0] + "/" + datname


def xacts(datname: str) -> tuple[int, int, int]:
    """(xact_commit, xact_rollback) of `datname`, and the server's next transaction id,
    read from another database. The id is cluster-wide and reading it assigns none: its
    growth counts the transactions that wrote (or locked rows), which read-only ones
    never get."""
    with psycopg.connect(in_db(LIBPQ, "postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit, xact_rollback,"
            " pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
            " FROM pg_stat_database WHERE datname = %s", (datname,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def start_workers(url: str, n: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "BENCH_DB_URL": url, "TIERS_LOG_LEVEL": "ERROR"}
    cmd = [sys.executable, "-m", "retrier", "worker", "bench.workpool_app:pool"]
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(n)]


def measure(mode: str, workers: int, runs: int) -> dict[str, Any]:
    datname = BENCH_DB
    libpq = in_db(LIBPQ, datname)
    schema = f"bench_{mode}_{workers}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{in_db(PG, datname)}?options=-csearch_path%3D{schema}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        os.environ["BENCH_DB_URL"] = url
        import bench.workpool_app as app

        app = importlib.reload(app)  # its Retrier and pool, on this schema
        poll = psycopg.connect(libpq, autocommit=True)
        poll.execute(f"SET search_path = {schema}")
        procs = start_workers(url, workers)
        deadline = time.monotonic() + 60
        while poll.execute("SELECT count(*) FROM tiers_workers").fetchone()[0] < workers:  # type: ignore[index]
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.1)
        time.sleep(1.5)  # idle, so their start-up statistics are flushed
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        commits0, rollbacks0, xid0 = xacts(datname)
        polls = 0
        start = time.perf_counter()
        if mode == "pool":
            app.pool.enqueue_batch([("noop", {"i": i}) for i in range(runs)])
        else:
            with app.retrier.session() as session:
                for i in range(runs):
                    app.retrier.run("noop", {"i": i}, session=session)
                session.commit()
        app.retrier.close()  # its backends exit and flush their statistics
        while True:
            polls += 1
            done = poll.execute(
                "SELECT count(*) FROM tiers_runs WHERE state = 'completed'").fetchone()[0]  # type: ignore[index]
            if done >= runs:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - start
        polls += 1
        first, last = poll.execute(
            "SELECT min(a.started_ms), max(r.finished_ms) FROM tiers_runs r "
            "JOIN tiers_attempts a ON a.run_id = r.id").fetchone()  # type: ignore[misc]
        attempts = poll.execute("SELECT count(*) FROM tiers_attempts").fetchone()[0]  # type: ignore[index]
        polls += 1
        cpu1 = [cpu_seconds(p.pid) for p in procs]
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        procs = []
        poll.close()
        time.sleep(1.0)
        commits1, rollbacks1, xid1 = xacts(datname)
    finally:
        for p in procs:
            p.kill()
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    cpu = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    return {
        "mode": mode, "workers": workers, "runs": runs, "attempts": attempts,
        "runs_per_s": runs / max((last - first) / 1000, 1e-3), "wall_s": wall,
        "commits_per_run": (commits1 - commits0 - polls) / runs,
        "rollbacks_per_run": (rollbacks1 - rollbacks0) / runs,
        "writes_per_run": (xid1 - xid0) / runs,
        "cpu_s_per_1k": 1000 * sum(cpu) / runs,
        "busiest_cpu_s_per_1k": 1000 * max(cpu) / runs,
        "worker_cpu_s": cpu,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20_000,
                        help="the backlog; at 5,000 the window was under a second here")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--mode", choices=["pool", "plain", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds; the table and verdict use their medians")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    modes = ["pool", "plain"] if args.mode == "both" else [args.mode]

    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with psycopg.connect(in_db(LIBPQ, "postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    try:
        for round_ in range(args.rounds):
            order = args.workers if round_ % 2 == 0 else list(reversed(args.workers))
            for mode in modes:
                for workers in order:
                    console.print(f"round {round_ + 1}/{args.rounds}: {mode}, {workers} "
                                  f"worker(s), {args.runs} runs ...")
                    samples.setdefault((mode, workers), []).append(
                        measure(mode, workers, args.runs))
    finally:
        with psycopg.connect(in_db(LIBPQ, "postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")

    rows = [median_row(samples[(mode, workers)]) for mode in modes for workers in args.workers]
    table = Table("load", "workers", "runs/s (min-max)", "commits/run", "writing txns/run",
                  "rollbacks/run", "worker CPU s / 1k runs", "busiest worker", "per worker CPU s",
                  title=(f"PostgreSQL, {args.runs} no-op runs in a backlog, worker processes: "
                         f"medians of {args.rounds} alternating round(s)"))
    for r in rows:
        table.add_row("pool of 10" if r["mode"] == "pool" else "plain runs", str(r["workers"]),
                      f"{r['runs_per_s']:,.0f} ({r['runs_per_s_min']:,.0f}-"
                      f"{r['runs_per_s_max']:,.0f})", f"{r['commits_per_run']:.2f}",
                      f"{r['writes_per_run']:.3f}",
                      f"{r['rollbacks_per_run']:.3f}", f"{r['cpu_s_per_1k']:.2f}",
                      f"{r['busiest_cpu_s_per_1k']:.2f}",
                      " ".join(f"{c:.1f}" for c in r["worker_cpu_s"]))
    out = Console(width=max(Console().width, 110))
    out.print(table)
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        rates = [r["runs_per_s"] for r in mine]
        commits = [r["commits_per_run"] for r in mine]
        writes = [r["writes_per_run"] for r in mine]
        steady = all(b >= a * 0.95 for a, b in itertools.pairwise(rates))
        out.print(f"{mode}: runs/s {' -> '.join(f'{x:,.0f}' for x in rates)} "
                  f"({'non-decreasing' if steady else 'DECREASES'} within 5%); commits/run "
                  f"{' -> '.join(f'{x:.2f}' for x in commits)} "
                  f"(max/min {max(commits) / min(commits):.2f}); writing transactions/run "
                  f"{' -> '.join(f'{x:.3f}' for x in writes)} "
                  f"(max/min {max(writes) / min(writes):.2f})")
    out.print("Noisy 2-core machine shared with the database server: absolute figures vary "
              "run to run; writing txns/run is the stable figure.")
    if args.json:
        print(json.dumps({"bench": "pg_scaling", "runs": args.runs, "rounds": args.rounds,
                          "rows": rows, "samples": [x for v in samples.values() for x in v]}))


def median_row(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One (mode, workers) cell over its rounds: the median of each figure, the rounds'
    runs/s range, and the per-worker CPU of the round with the median runs/s."""
    by_rate = sorted(measured, key=lambda r: r["runs_per_s"])
    row = dict(by_rate[(len(by_rate) - 1) // 2])
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in measured)
    row["runs_per_s_min"] = by_rate[0]["runs_per_s"]
    row["runs_per_s_max"] = by_rate[-1]["runs_per_s"]
    return row


if __name__ == "__main__":
    main()
