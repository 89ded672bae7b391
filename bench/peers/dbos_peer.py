"""DBOS Transact peer: queued workflows, sequential steps, step-retry backoff,
concurrent 5-step workflows.

DBOS runs workflows inside the application process (its standard mechanism: the
process that calls ``DBOS.launch()`` dequeues from its queues in background threads),
so there is no separate worker subprocess.  Backends: ``sqlite`` (file in a temp dir)
and ``postgres`` (a fresh database, dropped afterwards).

``noop`` enqueues ``noop_workflow`` (a workflow that calls one ``@DBOS.step``);
``--extra nostep`` enqueues ``bare_workflow`` (a workflow with no step) instead.
``workflows`` starts sync workflows with ``DBOS.start_workflow`` (each runs on a
thread); ``--extra async`` starts async ones (async steps) with
``DBOS.start_workflow_async`` from an event loop, one by one, as durable-tiers' harness
starts its async workflows with ``start_async``.
Checkpoints written per job, counted with SQLAlchemy statement events on SQLite:
with the step, 7 row writes (workflow_status + workflow_input at enqueue, status
updates at dequeue and at step start, one operation_outputs row, the final status
update + workflow_output); without it, 5. (durable-tiers writes 4 per run: the run
row, its claim, its completion and one attempts row.)

Durability: DBOS sets no journal mode or synchronous pragma on SQLite, so its system
database uses SQLite's defaults (rollback journal, synchronous FULL); on PostgreSQL
it uses the server's synchronous_commit (on by default). Both are reported in the
result as read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
import uuid
from collections.abc import Iterator

from dbos import DBOS, DBOSConfig

from bench.peers import common
from bench.peers.common import Args, JsonDict

PEER = "dbos"
QUEUE_NAME = "peers_bench"
BACKENDS = ("sqlite", "postgres")
HANDLE_POLL_S = 0.01
EXTRAS = ("", "nostep", "async")

_attempts: dict[str, int] = {}
_marks: dict[tuple[str, str], float] = {}


@DBOS.step()
def noop_step() -> int:
    return 1


@DBOS.workflow()
def noop_workflow() -> int:
    return noop_step()


@DBOS.workflow()
def bare_workflow() -> int:
    return 1


@DBOS.workflow()
def steps_workflow(count: int) -> int:
    for _ in range(count):
        noop_step()
    return count


@DBOS.workflow()
def five_steps_workflow() -> int:
    for _ in range(5):
        noop_step()
    return 5


@DBOS.step()
async def noop_step_async() -> int:
    return 1


@DBOS.workflow()
async def five_steps_workflow_async() -> int:
    for _ in range(5):
        await noop_step_async()
    return 5


@DBOS.step(
    retries_allowed=True, interval_seconds=common.BACKOFF_DELAY_S, backoff_rate=1.0, max_attempts=3
)
def flaky_step(key: str) -> int:
    now = time.time()
    attempt = _attempts.get(key, 0) + 1
    _attempts[key] = attempt
    if attempt == 1:
        _marks[("end1", key)] = time.time()
        raise RuntimeError("planned first-attempt failure")
    _marks.setdefault(("start2", key), now)
    return attempt


@DBOS.workflow()
def backoff_workflow(key: str) -> int:
    return flaky_step(key)


# ------------------------------------------------------------------ lifecycle


@contextlib.contextmanager
def system_database(backend: str) -> Iterator[str]:
    if backend == "sqlite":
        with common.temp_dir("dbos") as tmp:
            yield f"sqlite:///{tmp / 'dbos_sys.sqlite'}"
    else:
        with common.pg_database("bench_dbos") as url:
            yield url


@contextlib.contextmanager
def launched(url: str) -> Iterator[None]:
    config: DBOSConfig = {
        "name": "peers-bench",
        "system_database_url": url,
        "log_level": "WARNING",
        "executor_id": f"peers-bench-{uuid.uuid4().hex[:8]}",
    }
    DBOS(config=config)
    try:
        DBOS.launch()
        yield
    finally:
        DBOS.destroy(destroy_registry=False)


# ------------------------------------------------------------------ workloads


def bench_noop(args: Args) -> JsonDict:
    queue = DBOS.register_queue(
        QUEUE_NAME, worker_concurrency=args.concurrency, polling_interval_sec=args.poll
    )
    job = bare_workflow if args.extra == "nostep" else noop_workflow
    # Warm-up: the queue manager starts a queue's worker thread up to ~1 s after
    # registration; one job through the queue makes sure it is running.
    queue.enqueue(job).get_result(polling_interval_sec=HANDLE_POLL_S)
    watch = common.Stopwatch()
    handles = [queue.enqueue(job) for _ in range(args.n)]
    enqueue_s = watch.elapsed()
    for handle in handles:
        handle.get_result(polling_interval_sec=HANDLE_POLL_S)
    out = common.throughput(args.n, watch.elapsed())
    out.update(
        enqueue_s=round(enqueue_s, 4),
        concurrency=args.concurrency,
        poll_s=args.poll,
        limit="worker_concurrency",
        job="workflow, no step" if args.extra == "nostep" else "workflow + 1 step",
        note=(
            "queued workflow without a step: 5 row writes per job"
            if args.extra == "nostep"
            else "queued workflow with 1 step: 7 row writes per job"
        ),
    )
    return out


def bench_steps(args: Args) -> JsonDict:
    steps_workflow(1)  # warm-up (imports, connection pool)
    watch = common.Stopwatch()
    assert steps_workflow(args.n) == args.n
    elapsed = watch.elapsed()
    return {"elapsed_s": round(elapsed, 4), "ms_per_step": round(elapsed * 1000 / args.n, 3)}


def bench_workflows(args: Args) -> JsonDict:
    """`args.n` workflows of 5 steps started at once (DBOS runs each started workflow
    on a thread of the process), workflows/s until the last result is read."""
    if args.extra == "async":
        return asyncio.run(_bench_workflows_async(args.n))
    for handle in [DBOS.start_workflow(five_steps_workflow) for _ in range(20)]:  # warm up
        handle.get_result()
    watch = common.Stopwatch()
    handles = [DBOS.start_workflow(five_steps_workflow) for _ in range(args.n)]
    for handle in handles:
        handle.get_result()
    elapsed = watch.elapsed()
    return {"elapsed_s": round(elapsed, 4), "workflows_per_s": round(args.n / elapsed, 2),
            "note": f"{args.n} workflows of 5 steps, DBOS.start_workflow"}


async def _bench_workflows_async(n: int) -> JsonDict:
    """The same with async workflows, started from an event loop."""
    for handle in [await DBOS.start_workflow_async(five_steps_workflow_async) for _ in range(20)]:
        await handle.get_result()
    watch = common.Stopwatch()
    handles = [await DBOS.start_workflow_async(five_steps_workflow_async) for _ in range(n)]
    for handle in handles:
        await handle.get_result()
    elapsed = watch.elapsed()
    return {"elapsed_s": round(elapsed, 4), "workflows_per_s": round(n / elapsed, 2),
            "note": f"{n} async workflows of 5 async steps, DBOS.start_workflow_async"}


def bench_backoff(args: Args) -> JsonDict:
    rng = random.Random(1234)
    keys = [f"s{i}" for i in range(args.n)]
    for key in keys:
        common.sample_gap(rng, args.gap)
        backoff_workflow(key)
    lateness = common.backoff_lateness(_marks, keys)
    out = common.lateness_summary(lateness)
    out.update(
        delay_s=common.BACKOFF_DELAY_S,
        mechanism="@DBOS.step(retries_allowed, interval_seconds=0.25, backoff_rate=1)",
    )
    return out


WORKLOADS = {
    "noop": bench_noop,
    "steps": bench_steps,
    "backoff": bench_backoff,
    "workflows": bench_workflows,
}


def bench(args: Args) -> JsonDict:
    if args.backend not in BACKENDS:
        return common.unsupported(PEER, args, f"backend must be one of {BACKENDS}")
    if args.extra not in EXTRAS:
        return common.unsupported(PEER, args, f"--extra must be one of {EXTRAS}")
    result = common.base_result(PEER, args, "dbos")
    with system_database(args.backend) as url, launched(url):
        result.update(WORKLOADS[args.workload](args))
        result["durability"] = _durability(url)
    return result


def _durability(url: str) -> str:
    """How durable DBOS's commits are here, as the database reports it."""
    if url.startswith("sqlite:///"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            journal = conn.execute("pragma journal_mode").fetchone()[0]
            level = conn.execute("pragma synchronous").fetchone()[0]
        names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        return f"journal_mode={journal}, synchronous={names.get(level, level)} (SQLite default)"
    return f"synchronous_commit={common.pg_setting(url, 'synchronous_commit')} (server default)"


def main(argv: list[str] | None = None) -> int:
    return common.run_main(PEER, "sqlite", bench, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
