"""The app that `tiers worker tests.pool_app:pool` processes run in the process tests.

Settings come from the environment, so the test and every worker build the same pool:
TIERS_TEST_DB_URL (database), TIERS_TEST_POOL (JSON: name, max_parallelism,
max_per_key, rate_limit as [limit, seconds], round_robin_keys, key_limits as
{key: cap}, group as {name, max_parallelism} with guaranteed, and the group's
other members as [{name, max_parallelism, guaranteed}]), TIERS_TEST_RECORD_DIR
(where actions record their intervals).

Each attempt appends "start <pid> <ns>" and later "end <pid> <ns>" to a file of its
own item, instead of writing a table: the record must not compete for the database
lock whose behaviour is under test (on SQLite every write takes it), it cannot fail
or slow a claim, and an attempt killed by SIGKILL leaves a start without an end,
which is exactly what the test needs to see.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from retrier import Retrier
from workpool import PoolGroup, RetryBehavior, Workpool


def make_pool(r: Retrier, settings: dict[str, Any]) -> Workpool:
    """The pool the settings describe; items are retried, so a killed attempt reruns."""
    rate = settings.get("rate_limit")
    group = settings.get("group")
    if group is not None:
        PoolGroup(r, group["name"], max_parallelism=group["max_parallelism"])
        for member in settings.get("members", []):
            Workpool(r, member["name"], max_parallelism=member["max_parallelism"],
                     group=group["name"], guaranteed=member["guaranteed"],
                     retry_actions_by_default=True)
    pool = Workpool(
        r,
        settings["name"],
        max_parallelism=settings.get("max_parallelism", 3),
        max_per_key=settings.get("max_per_key"),
        rate_limit=(rate[0], rate[1]) if rate else None,
        round_robin_keys=settings.get("round_robin_keys", False),
        retry_actions_by_default=True,
        default_retry_behavior=RetryBehavior(max_attempts=5, initial_backoff_ms=50),
        group=group["name"] if group else None,
        guaranteed=settings.get("guaranteed", 0),
    )
    for key, cap in settings.get("key_limits", {}).items():
        pool.set_key_limit(key, max_parallelism=cap)
    return pool


def register(r: Retrier) -> None:
    """Register the action on `r` (the test process registers it to enqueue)."""
    r.action(name="record_interval")(record_interval)


def record_interval(item: int, ms: int) -> int:
    _mark(item, "start")
    time.sleep(ms / 1000)
    _mark(item, "end")
    return item


def _mark(item: int, what: str) -> None:
    line = f"{what} {os.getpid()} {time.time_ns()}\n".encode()
    path = Path(os.environ["TIERS_TEST_RECORD_DIR"]) / str(item)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


if "TIERS_TEST_DB_URL" in os.environ:  # in a worker process
    retrier = Retrier(os.environ["TIERS_TEST_DB_URL"], lease=timedelta(seconds=2))
    register(retrier)
    pool = make_pool(retrier, json.loads(os.environ["TIERS_TEST_POOL"]))
