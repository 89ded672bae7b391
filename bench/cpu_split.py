"""Where one no-op run's CPU goes, end to end: the producer, the worker, the database.

    python -m bench.cpu_split --db sqlite --durability normal full
    python -m bench.cpu_split --db postgresql --durability full --n 5000 --rounds 2
    python -m bench.cpu_split --db postgresql --durability full --no-insert-notify

The workload of `bench.ours noop` (and so of `bench.compare`'s no-op row): this process
calls `retrier.run("noop_sync")` n times while one worker process (concurrency 10)
runs them; the clock stops when the last has completed. Per run it prints the wall
time and the CPU of each part, from the kernel's counters (psutil):

- producer: this process's Python (the `run()` calls and the completion poll);
- worker: the worker process;
- on PostgreSQL, the server processes by what they serve: the producer's
  connection, the worker's pooled connections, the worker's LISTEN connection, the
  rest (background writers, the completion poll's connection); and how many
  NOTIFYs on the wake channel each run cost;
- on SQLite, where the database runs inside both processes, the machine's busy time.

`--no-insert-notify` (PostgreSQL) drops the trigger that announces each inserted run,
once the worker is listening: the worker then learns of new runs only from its own
records' refills and its poll. An experiment, not a setting: it shows what the
per-insert NOTIFY costs where one worker is always busy (an idle worker would then
wait for its poll).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil
from rich.console import Console
from rich.table import Table

from bench.apps import build
from bench.pg_scaling import cpu_seconds
from bench.throughput import DURABILITIES, PG_URL, fresh_database, wait_completed, worker_processes
from retrier import Retrier

console = Console(stderr=True)
LIBPQ = PG_URL.replace("postgresql+psycopg://", "postgresql://")


@dataclass
class Split:
    runs_per_s: float
    wall_us: float
    cpu_us: dict[str, float] = field(default_factory=dict)
    notifies_per_run: float | None = None


def _cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """Each process's CPU seconds; one that has exited is left out (a pooled
    connection closed during the window: its share is not known)."""
    cpu: dict[int, float] = {}
    for pid in pids:
        try:
            cpu[pid] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return cpu


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


def _server_processes(worker_pid: int) -> dict[int, str]:
    """PostgreSQL's processes, each labelled by the part of the benchmark it serves."""
    import psycopg

    with psycopg.connect(LIBPQ, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, backend_type, query, client_port FROM pg_stat_activity"
        ).fetchall()
    ours = {c.laddr.port for c in psutil.Process().net_connections()}
    worker = {c.laddr.port for c in psutil.Process(worker_pid).net_connections()}
    labelled: dict[int, str] = {}
    for pid, backend_type, query, port in rows:
        if backend_type != "client backend":
            label = "server: background"
        elif port in ours:
            label = "server: producer's connection"
        elif port in worker:
            listening = (query or "").startswith("LISTEN")
            label = "server: worker's LISTEN" if listening else "server: worker's pool"
        else:
            label = "server: other clients"
        labelled[pid] = label
    return labelled


class _NotifyCounter:
    """Counts the NOTIFYs on the wake channel while it runs (a LISTEN of its own)."""

    def __init__(self, channel: str) -> None:
        self.count = 0
        self._channel = channel
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def __enter__(self) -> _NotifyCounter:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # the last ones in flight
        self._stop.set()
        self._thread.join(5)

    def _listen(self) -> None:
        import psycopg

        with psycopg.connect(LIBPQ, autocommit=True) as conn:
            conn.execute(f'LISTEN "{self._channel}"')
            self._ready.set()
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=0.1):
                    self.count += 1


def measure(kind: str, n: int, durability: str, insert_notify: bool = True) -> Split:
    with fresh_database(kind) as url:
        retrier = build(url, concurrency=10, durability=durability)
        try:
            retrier.run("noop_sync")  # the tables, and a connection, before the clock
            with worker_processes(url, 1, 10, durability) as (worker,):
                time.sleep(1.5)  # let it import, connect and listen
                if kind == "postgresql" and not insert_notify:
                    with retrier.engine.begin() as conn:
                        conn.exec_driver_sql("DROP TRIGGER tiers_runs_wake ON tiers_runs")
                return _measured(retrier, kind, n, worker.pid)
        finally:
            retrier.close()


def _measured(retrier: Retrier, kind: str, n: int, worker_pid: int) -> Split:
    parts = {os.getpid(): "producer (Python)", worker_pid: "worker (Python)"}
    if kind == "postgresql":
        parts |= _server_processes(worker_pid)
    channel = retrier.store.dialect.wake_channel
    counter = _NotifyCounter(channel) if kind == "postgresql" else None
    with counter or contextlib.nullcontext():
        before = _cpu_by_pid(parts)
        busy = _machine_busy()
        start = time.perf_counter()
        for _ in range(n):
            retrier.run("noop_sync")
        wait_completed(retrier, n, timeout=600)
        wall = time.perf_counter() - start
        used: dict[str, float] = {}
        for pid, seconds in _cpu_by_pid(before).items():
            used[parts[pid]] = used.get(parts[pid], 0.0) + seconds - before[pid]
        if kind == "sqlite":
            used["machine busy"] = _machine_busy() - busy
    return Split(
        runs_per_s=n / wall,
        wall_us=wall / n * 1e6,
        cpu_us={label: seconds / n * 1e6 for label, seconds in used.items()},
        notifies_per_run=None if counter is None else counter.count / n,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    parser.add_argument("--durability", nargs="+", default=["full"], choices=DURABILITIES)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-insert-notify", action="store_true",
                        help="PostgreSQL: drop the per-insert NOTIFY trigger (an experiment)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TIERS_LOG_LEVEL", "WARNING")
    out = Console()
    for kind in args.db:
        for durability in args.durability:
            splits = [measure(kind, args.n, durability, not args.no_insert_notify)
                      for _ in range(args.rounds)]
            title = f"{kind}, durability {durability}, {args.n} no-op runs, 1 worker"
            if kind == "postgresql" and args.no_insert_notify:
                title += ", no NOTIFY per insert"
            table = Table("per run", *[f"round {i + 1}" for i in range(len(splits))],
                          title=title)
            table.add_row("runs/s", *[f"{s.runs_per_s:,.0f}" for s in splits])
            table.add_row("wall µs", *[f"{s.wall_us:,.0f}" for s in splits])
            labels = dict.fromkeys(label for s in splits for label in s.cpu_us)
            for label in labels:
                table.add_row(f"CPU µs, {label}",
                              *[f"{s.cpu_us.get(label, 0.0):,.0f}" for s in splits])
            if splits[0].notifies_per_run is not None:
                table.add_row("NOTIFYs on the wake channel",
                              *[f"{s.notifies_per_run:.2f}" for s in splits])
            out.print(table)


if __name__ == "__main__":
    main()
