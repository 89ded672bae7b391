"""Huey peer: SqliteHuey with a thread-based consumer in a subprocess.

The consumer polls its SQLite queue; ``--poll`` sets both ``initial_delay`` and
``max_delay`` (fixed-interval polling; huey's own defaults are 0.1 s growing to 10 s).
Retries with a delay go through huey's schedule, which the consumer's scheduler
only checks once per ``scheduler_interval`` (minimum 1 s), so a 250 ms retry delay
is honoured with up-to-1 s granularity.

Durability (``--durability``): SqliteStorage opens its connections in WAL mode and
takes ``fsync=None|True|False``: None leaves SQLite's compiled-in default, which is
synchronous FULL for this build (DEFAULT_WAL_SYNCHRONOUS=2; the result reports the
pragma as read back), True sets FULL (2) and False sets OFF (0), not NORMAL.
``--durability full`` passes ``fsync=True``; ``--durability normal`` uses a small
SqliteStorage subclass that sets ``PRAGMA synchronous=NORMAL`` on each new connection
(huey has no option for NORMAL); the default (no flag) is huey's own: FULL.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from huey import SqliteHuey
from huey.api import Task, TaskWrapper
from huey.storage import SqliteStorage

from bench.peers import common
from bench.peers.common import Args, EventLog, JsonDict

PEER = "huey"
MODULE = "bench.peers.huey_peer"
SCHEDULER_INTERVAL_S = 1  # huey's minimum


SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


class NormalSyncStorage(SqliteStorage):
    """SqliteStorage whose connections use ``PRAGMA synchronous=NORMAL``."""

    def _create_connection(self) -> Any:
        conn = super()._create_connection()
        conn.execute("pragma synchronous=1")
        return conn


class NormalSyncHuey(SqliteHuey):
    storage_class = NormalSyncStorage


def make_huey(filename: str, durability: str) -> SqliteHuey:
    if durability == "normal":
        return NormalSyncHuey("peers-bench", filename=filename)
    if durability == "full":
        return SqliteHuey("peers-bench", filename=filename, fsync=True)
    return SqliteHuey("peers-bench", filename=filename)  # huey's default: fsync=None


@dataclass(frozen=True)
class HueyApp:
    huey: SqliteHuey
    noop: TaskWrapper
    flaky: TaskWrapper


def build_app(state_dir: Path, durability: str = "") -> HueyApp:
    """Create the huey instance and its tasks (same code in app and consumer)."""
    huey = make_huey(str(state_dir / "huey.sqlite"), durability)
    events = EventLog(state_dir / "events.jsonl")

    @huey.task(name="noop")
    def noop() -> int:
        return 1  # huey does not store ``None`` results by default

    @huey.task(name="flaky", retries=1, retry_delay=common.BACKOFF_DELAY_S, context=True)
    def flaky(key: str, task: Task | None = None) -> int:
        assert task is not None
        if task.retries > 0:  # first attempt: a retry is still available
            events.record("end1", key)
            raise RuntimeError("planned first-attempt failure")
        events.record("start2", key)
        return 2

    return HueyApp(huey, noop, flaky)


# ---------------------------------------------------------------------- worker


def worker(args: Args) -> JsonDict:
    app = build_app(Path(args.state), args.durability)
    consumer = app.huey.create_consumer(
        workers=args.concurrency,
        worker_type="thread",
        periodic=False,
        initial_delay=args.poll,
        backoff=1.0,
        max_delay=args.poll,
        scheduler_interval=SCHEDULER_INTERVAL_S,
    )
    consumer.run()  # returns when SIGTERM/SIGINT stops the consumer
    return {}


# -------------------------------------------------------------------- app side


def _warm_up(app: HueyApp, timeout: float) -> None:
    result: Any = app.noop()
    value = result.get(
        blocking=True, timeout=timeout, backoff=1.0, max_delay=common.OBSERVE_INTERVAL_S
    )
    if value != 1:
        raise RuntimeError("huey warm-up job did not complete")


def bench_noop(app: HueyApp, args: Args) -> JsonDict:
    watch = common.Stopwatch()
    for _ in range(args.n):
        app.noop()
    enqueue_s = watch.elapsed()
    common.wait_until(
        lambda: app.huey.result_count() >= args.n, args.timeout, what="huey noop results"
    )
    out = common.throughput(args.n, watch.elapsed())
    out.update(
        enqueue_s=round(enqueue_s, 4),
        concurrency=args.concurrency,
        poll_s=args.poll,
        worker="huey consumer subprocess, thread workers",
    )
    return out


def bench_backoff(app: HueyApp, args: Args, events: EventLog) -> JsonDict:
    rng = random.Random(1234)
    keys = [f"s{i}" for i in range(args.n)]
    for key in keys:
        common.sample_gap(rng, args.gap)
        app.flaky(key)
        common.wait_until(partial(events.has, "start2", key), 30.0, what=f"retry of {key}")
    out = common.lateness_summary(common.backoff_lateness(events.read(), keys))
    out.update(
        delay_s=common.BACKOFF_DELAY_S,
        poll_s=args.poll,
        mechanism="@huey.task(retries=1, retry_delay=0.25)",
        note=(
            "retry_delay=0.25 is accepted, but delayed tasks wait in huey's "
            "schedule, which the consumer checks every scheduler_interval "
            "(integer seconds, min 1 s): expect up to ~1 s lateness"
        ),
    )
    return out


def bench(args: Args) -> JsonDict:
    if args.workload == "steps":
        return common.unsupported(PEER, args, "huey has tasks, not durable workflow steps")
    if args.backend != "sqlite":
        return common.unsupported(PEER, args, "this harness runs SqliteHuey only")
    result = common.base_result(PEER, args, "huey")
    with common.temp_dir("huey") as state_dir:
        app = build_app(state_dir, args.durability)
        level = app.huey.storage.conn.execute("pragma synchronous").fetchone()[0]
        result["synchronous"] = SYNCHRONOUS.get(level, str(level))
        result["durability"] = args.durability or "default"
        argv = common.worker_argv(MODULE, args, str(state_dir))
        with common.worker_process(argv) as proc:
            _warm_up(app, 30.0)
            common.ensure_alive(proc)
            if args.workload == "noop":
                result.update(bench_noop(app, args))
            else:
                result.update(bench_backoff(app, args, EventLog(state_dir / "events.jsonl")))
    return result


def main(argv: list[str] | None = None) -> int:
    return common.run_main(PEER, "sqlite", bench, worker, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
