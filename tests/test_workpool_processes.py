"""The workpool's limits hold across real worker processes, one of them SIGKILLed.

Workers are `python -m retrier worker tests.pool_app:pool --lease 2` processes (the
`tiers worker` command), 4 on PostgreSQL and 2 on one SQLite file. Each action
records its own start and end (see tests/pool_app.py for why in a file per item).
Half-way through, the test SIGKILLs a worker that holds a running item: its
attempt really dies (its interval ends at the kill), its slot stays taken until the
lease expires, and another worker retries the item.

The overlap is measured on the intervals the actions record: that is the
parallelism users get. The engine's own stamps in tiers_attempts cannot measure it:
`started_ms` is read inside the claim transaction, before it commits, so a process
descheduled between reading the clock and committing stamps a start that lies
before the moment its row really became `running` (seen here: stamped overlaps of
6 while the actions never overlapped more than 3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from retrier import Completed, Retrier, Success
from tests.support import stop_processes
from workpool import Workpool

sys.path.insert(0, str(Path(__file__).parent))
from pool_app import make_pool, register

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 35
LONG_ITEMS, LONG_MS = 3, 800  # added half-way; one of them is running when a worker dies


@dataclass(frozen=True)
class Interval:
    item: int
    pid: int
    start: int  # ns
    end: int  # ns: the recorded end, or the kill time for the killed attempt


@dataclass
class Outcome:
    intervals: list[Interval]
    ends: dict[int, int]  # item -> how many attempts recorded an end
    attempts: list[Any]  # tiers_attempts rows of the pool
    killed_pid: int
    killed_at: int
    took_s: float
    statuses: dict[str, Any] = field(default_factory=dict)


def max_overlap(spans: Iterable[tuple[int, int]]) -> int:
    """The most half-open intervals [start, end) covering one instant."""
    events = sorted(e for s, t in spans for e in ((s, 1), (t, -1)))  # ends sort first
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def run_pool(
    db_url: str,
    tmp_path: Path,
    settings: dict[str, Any],
    *,
    items: int,
    ms: int,
    workers: int,
    key: Callable[[int], str] | None = None,
) -> Outcome:
    """Enqueue `items` actions of `ms` each, run them on `workers` processes, SIGKILL
    one running an item half-way, and collect what happened (LONG_ITEMS more items)."""
    record = tmp_path / "record"
    record.mkdir()
    retrier = Retrier(db_url)
    try:
        register(retrier)
        pool: Workpool = make_pool(retrier, settings)
        ids = pool.enqueue_batch(
            [
                ("record_interval", {"item": i, "ms": ms}, {"key": key(i)} if key else {})
                for i in range(items)
            ]
        )
        env = {
            **os.environ,
            "TIERS_TEST_DB_URL": db_url,
            "TIERS_TEST_POOL": json.dumps(settings),
            "TIERS_TEST_RECORD_DIR": str(record),
            "TIERS_LOG_LEVEL": "ERROR",
        }
        command = [sys.executable, "-m", "retrier", "worker", "tests.pool_app:pool",
                   "--lease", "2"]
        logs = [open(tmp_path / f"worker{n}.log", "wb") for n in range(workers)]
        procs = [
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            for log in logs
        ]
        started = time.monotonic()
        try:
            killed_pid, killed_at = _kill_one_half_way(retrier, pool, procs, items, started, key)
            _wait_until_done(retrier, pool.name, items + LONG_ITEMS, started)
        finally:
            stop_processes(procs, logs)
        took = time.monotonic() - started
        intervals, ends = _read_records(record, killed_pid, killed_at)
        with retrier.engine.connect() as conn:
            attempts = conn.execute(
                text("SELECT started_ms, finished_ms, outcome FROM tiers_attempts "
                     "WHERE queue = :q"),
                {"q": pool.name},
            ).all()
        rows = retrier.store.list_runs(queue=pool.name, limit=100_000)
        statuses = {row.id: retrier.status_of(row) for row in rows}
        assert set(ids) <= statuses.keys()
        return Outcome(intervals, ends, list(attempts), killed_pid, killed_at, took, statuses)
    finally:
        retrier.close()


def _completed(retrier: Retrier, queue: str) -> int:
    with retrier.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM tiers_runs WHERE queue = :q AND state = 'completed'"),
                {"q": queue},
            ).scalar()
            or 0
        )


def _kill_one_half_way(
    retrier: Retrier, pool: Workpool, procs: list[subprocess.Popen[bytes]], items: int,
    started: float, key: Callable[[int], str] | None,
) -> tuple[int, int]:
    """At half-way, add LONG_ITEMS long items due first; SIGKILL the worker running one.

    Killing a worker between two short items would let the kill miss running work;
    a long item is certainly running when its worker dies.
    """
    by_pid = {p.pid: p for p in procs}
    while _completed(retrier, pool.name) < items // 2:
        if time.monotonic() - started > DEADLINE_S:
            pytest.fail(f"half the items did not finish within {DEADLINE_S} s")
        time.sleep(0.01)
    past = datetime.now(UTC) - timedelta(minutes=1)  # due before every waiting item
    long_ids = pool.enqueue_batch(
        [
            ("record_interval", {"item": i, "ms": LONG_MS},
             {"run_at": past, **({"key": key(i)} if key else {})})
            for i in range(items, items + LONG_ITEMS)
        ]
    )
    while time.monotonic() - started < DEADLINE_S:
        rows = retrier.store.get_many(long_ids).values()
        pids = [int(r.lease_owner.split(":")[1]) for r in rows
                if r.state == "running" and r.lease_owner]
        if pids:
            victim = by_pid[pids[0]]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            return victim.pid, time.time_ns()
        time.sleep(0.005)
    pytest.fail("no long item started")


def _wait_until_done(retrier: Retrier, queue: str, items: int, started: float) -> None:
    while _completed(retrier, queue) < items:
        if time.monotonic() - started > DEADLINE_S:
            pytest.fail(f"only {_completed(retrier, queue)} of {items} finished in time")
        time.sleep(0.05)


def _read_records(
    record: Path, killed_pid: int, killed_at: int
) -> tuple[list[Interval], dict[int, int]]:
    intervals: list[Interval] = []
    ends: dict[int, int] = defaultdict(int)
    for path in record.iterdir():
        item = int(path.name)
        open_starts: dict[int, int] = {}
        for line in path.read_text().splitlines():
            what, pid_text, ns_text = line.split()
            pid, ns = int(pid_text), int(ns_text)
            if what == "start":
                assert pid not in open_starts, f"item {item} started twice in one process"
                open_starts[pid] = ns
            else:
                intervals.append(Interval(item, pid, open_starts.pop(pid), ns))
                ends[item] += 1
        for pid, start in open_starts.items():
            assert pid == killed_pid, f"item {item}: an attempt in {pid} never ended"
            intervals.append(Interval(item, pid, start, killed_at))
    return intervals, ends


def check_common(outcome: Outcome, items: int) -> None:
    assert outcome.statuses.keys() and all(
        isinstance(s, Completed) and isinstance(s.result, Success)
        for s in outcome.statuses.values()
    ), "every item finished, successfully"
    total = items + LONG_ITEMS
    assert len(outcome.statuses) == total
    assert sorted(outcome.ends) == list(range(total)), "every action ran to its end"
    # Only the killed worker may have run an item to its end without recording it
    # (killed between the action's end and the outcome): then it ran again elsewhere.
    survivors = defaultdict(int)
    for i in outcome.intervals:
        if i.pid != outcome.killed_pid and i.end != outcome.killed_at:
            survivors[i.item] += 1
    assert max(survivors.values()) == 1, "no item ran to its end twice in live workers"
    lost = [a for a in outcome.attempts if a.outcome == "lost"]
    assert lost, "the SIGKILL hit a running item, whose lease expired and was retried"
    assert outcome.took_s < DEADLINE_S


WORKERS = {"postgresql": 4, "sqlite": 2}


def _workers(db_url: str) -> int:
    return WORKERS["postgresql" if db_url.startswith("postgresql") else "sqlite"]


def test_the_cap_holds_across_processes(db_url: str, tmp_path: Path) -> None:
    settings = {"name": "capped", "max_parallelism": 3}
    outcome = run_pool(db_url, tmp_path, settings, items=250, ms=40, workers=_workers(db_url))
    check_common(outcome, 250)
    spans = [(i.start, i.end) for i in outcome.intervals]
    assert max_overlap(spans) == 3, "at most 3 at once, and the pool was used fully"


def test_the_per_key_limit_holds_across_processes(db_url: str, tmp_path: Path) -> None:
    settings = {"name": "keyed", "max_parallelism": 5, "max_per_key": 2}
    outcome = run_pool(db_url, tmp_path, settings, items=200, ms=30,
                       workers=_workers(db_url), key=lambda i: f"k{i % 4}")
    check_common(outcome, 200)
    by_key: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i in outcome.intervals:
        by_key[i.item % 4].append((i.start, i.end))
    per_key = [max_overlap(spans) for spans in by_key.values()]
    assert max(per_key) == 2, per_key
    assert max_overlap((i.start, i.end) for i in outcome.intervals) <= 5


def test_the_rate_limit_holds_across_processes(db_url: str, tmp_path: Path) -> None:
    limit, period_ms = 10, 250
    settings = {"name": "rated", "max_parallelism": 50, "rate_limit": [limit, period_ms / 1000]}
    outcome = run_pool(db_url, tmp_path, settings, items=80, ms=20, workers=_workers(db_url))
    check_common(outcome, 80)
    # A start is the claim's time, as the engine stamps it in tiers_attempts (lost
    # attempts included): the action's own first line follows it by thread start-up
    # jitter, which is not what the limit governs.
    starts = sorted(a.started_ms for a in outcome.attempts)
    in_window = [
        sum(1 for t in starts if s <= t < s + period_ms) for s in starts
    ]
    assert max(in_window) == limit, "never more than the limit in any window, and used fully"
    assert outcome.took_s > (80 / limit - 1) * period_ms / 1000


def test_keys_take_turns_across_processes(db_url: str, tmp_path: Path) -> None:
    """A round-robin pool: one tenant's backlog, enqueued first, does not delay the
    other tenants' items, whichever of the worker processes claims."""
    big, small = 120, 30
    settings = {"name": "turns", "max_parallelism": 3, "round_robin_keys": True}
    outcome = run_pool(db_url, tmp_path, settings, items=big + small, ms=30,
                       workers=_workers(db_url),
                       key=lambda i: "big" if i < big else f"t{i % 10}")
    check_common(outcome, big + small)
    starts = sorted((i.start, i.item) for i in outcome.intervals)
    first_of: dict[str, int] = {}
    for rank, (_, item) in enumerate(starts):
        if big <= item < big + small:
            first_of.setdefault(f"t{item % 10}", rank)
    assert len(first_of) == 10
    # 11 keys take turns, 3 at a time: every small tenant starts within a few turns,
    # long before the big tenant's backlog (120 items ahead of them) is done.
    assert max(first_of.values()) < 25, first_of
    assert max_overlap((i.start, i.end) for i in outcome.intervals) <= 3


def test_a_keys_own_cap_holds_across_processes(db_url: str, tmp_path: Path) -> None:
    """Per-tenant caps stored as data: one key may run 4 at once, another 1, the
    others the pool's max_per_key of 2, counted by every worker process alike."""
    settings = {"name": "tenants", "max_parallelism": 7, "max_per_key": 2,
                "key_limits": {"big": 4, "one": 1}}
    names = ["big", "big", "k1", "one"]
    outcome = run_pool(db_url, tmp_path, settings, items=160, ms=30,
                       workers=_workers(db_url), key=lambda i: names[i % 4])
    check_common(outcome, 160)
    by_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i in outcome.intervals:
        by_key[names[i.item % 4]].append((i.start, i.end))
    per_key = {key: max_overlap(spans) for key, spans in by_key.items()}
    assert per_key == {"big": 4, "k1": 2, "one": 1}, per_key
    assert max_overlap((i.start, i.end) for i in outcome.intervals) <= 7
