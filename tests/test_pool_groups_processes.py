"""A pool group's cap holds across real worker processes (4 on PostgreSQL, 2 on one
SQLite file), one of them SIGKILLed while it runs an item: three member pools, one
with a backlog due first, the others guaranteed slots of the group. Intervals are the
ones the actions record (see tests/pool_app.py and tests/test_workpool_processes.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from retrier import Completed, Retrier, Success
from tests.support import stop_processes
from workpool import Workpool

sys.path.insert(0, str(Path(__file__).parent))
from pool_app import make_pool, register
from test_workpool_processes import (
    DEADLINE_S,
    ROOT,
    _completed,
    _read_records,
    _workers,
    max_overlap,
)

pytestmark = pytest.mark.processes

CAP = 5
SETTINGS = {
    "name": "train", "max_parallelism": 4, "guaranteed": 2,
    "group": {"name": "gpu", "max_parallelism": CAP},
    "members": [
        {"name": "infer", "max_parallelism": 4, "guaranteed": 2},
        {"name": "batch", "max_parallelism": 5, "guaranteed": 0},
    ],
}
ITEMS = {"batch": range(200, 360), "train": range(0, 60), "infer": range(100, 160)}


def test_a_groups_cap_holds_across_processes(db_url: str, tmp_path: Path) -> None:
    record = tmp_path / "record"
    record.mkdir()
    retrier = Retrier(db_url)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        register(retrier)
        make_pool(retrier, SETTINGS)
        pools = {name: Workpool(retrier, name, max_parallelism=cap, group="gpu",
                                guaranteed=g, retry_actions_by_default=True)
                 for name, cap, g in (("train", 4, 2), ("infer", 4, 2), ("batch", 5, 0))}
        for name, items in ITEMS.items():  # batch's backlog first: due before the others
            pools[name].enqueue_batch(
                [("record_interval", {"item": i, "ms": 30}) for i in items]
            )
        env = {**os.environ, "TIERS_TEST_DB_URL": db_url,
               "TIERS_TEST_POOL": json.dumps(SETTINGS), "TIERS_TEST_RECORD_DIR": str(record),
               "TIERS_LOG_LEVEL": "ERROR"}
        command = [sys.executable, "-m", "retrier", "worker", "tests.pool_app:pool",
                   "--lease", "2"]
        for n in range(_workers(db_url)):
            logs.append(open(tmp_path / f"worker{n}.log", "wb"))
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=logs[-1],
                                          stderr=subprocess.STDOUT))
        started = time.monotonic()
        total = sum(len(items) for items in ITEMS.values())
        killed_pid, killed_at = _kill_one_running(retrier, procs, total // 3, started)
        while sum(_completed(retrier, name) for name in ITEMS) < total:
            if time.monotonic() - started > DEADLINE_S:
                pytest.fail(f"the items did not finish within {DEADLINE_S} s")
            time.sleep(0.05)
        statuses = [retrier.status_of(row) for name in ITEMS
                    for row in retrier.store.list_runs(queue=name, limit=1000)]
    finally:
        stop_processes(procs, logs)
        retrier.close()
    assert len(statuses) == total
    assert all(isinstance(s, Completed) and isinstance(s.result, Success) for s in statuses)
    intervals, _ = _read_records(record, killed_pid, killed_at)
    pool_of = {i: name for name, items in ITEMS.items() for i in items}
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i in intervals:
        spans[pool_of[i.item]].append((i.start, i.end))
    everything = [span for pool in spans.values() for span in pool]
    assert max_overlap(everything) == CAP, "never above the group's cap, and reached"
    overlap = {name: max_overlap(pool) for name, pool in spans.items()}
    assert overlap["train"] <= 4 and overlap["infer"] <= 4 and overlap["batch"] <= 5
    # batch's backlog was due first, yet train and infer got their guaranteed slots
    # while it still had items waiting: they started before batch's last item did.
    last_batch_start = max(start for start, _ in spans["batch"])
    assert min(start for start, _ in spans["train"]) < last_batch_start
    assert min(start for start, _ in spans["infer"]) < last_batch_start
    assert overlap["train"] >= 2 and overlap["infer"] >= 2, overlap


def _kill_one_running(
    retrier: Retrier, procs: list[subprocess.Popen[bytes]], after: int, started: float
) -> tuple[int, int]:
    """Once `after` items finished, SIGKILL a worker that holds a running item."""
    by_pid = {p.pid: p for p in procs}
    while time.monotonic() - started < DEADLINE_S:
        done = sum(_completed(retrier, name) for name in ITEMS)
        rows = [row for name in ITEMS
                for row in retrier.store.list_runs(state="running", queue=name, limit=20)]
        owners = [int(r.lease_owner.split(":")[1]) for r in rows if r.lease_owner]
        if done >= after and owners:
            victim = by_pid[owners[0]]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            return victim.pid, time.time_ns()
        time.sleep(0.005)
    pytest.fail("no item was running to kill")
