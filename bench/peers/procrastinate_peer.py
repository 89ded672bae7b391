"""Procrastinate peer: PostgreSQL job queue, async worker in a subprocess.

The worker uses LISTEN/NOTIFY for new jobs plus polling every
``fetch_job_polling_interval`` (``--poll``; procrastinate's default is 5 s).
A retried job is re-scheduled (``scheduled_at`` in the future) and only found by
the polling loop.

``RetryStrategy(wait=...)`` is typed ``int`` seconds, so 250 ms is expressed with a
small ``BaseRetryStrategy`` subclass (procrastinate's documented extension point)
returning ``RetryDecision(retry_in={"milliseconds": 250})``.

Durability: procrastinate commits with the server's synchronous_commit (on by
default), reported in the result as read back.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from procrastinate import App, BaseRetryStrategy, JobContext, PsycopgConnector, RetryDecision
from procrastinate.jobs import Job

from bench.peers import common
from bench.peers.common import Args, EventLog, JsonDict

PEER = "procrastinate"
MODULE = "bench.peers.procrastinate_peer"
QUEUE = "peers_bench"


class FixedDelayRetry(BaseRetryStrategy):
    """Retry once, ``delay_ms`` after the failure."""

    def __init__(self, delay_ms: int, max_attempts: int = 2) -> None:
        self.delay_ms = delay_ms
        self.max_attempts = max_attempts

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if job.attempts + 1 >= self.max_attempts:
            return None
        return RetryDecision(retry_in={"milliseconds": self.delay_ms})


def build_app(dsn: str, events: EventLog) -> App:
    app = App(connector=PsycopgConnector(conninfo=dsn))

    @app.task(name="noop", queue=QUEUE)
    async def noop() -> None:
        return None

    retry = FixedDelayRetry(delay_ms=int(common.BACKOFF_DELAY_S * 1000))

    @app.task(name="flaky", queue=QUEUE, retry=retry, pass_context=True)
    async def flaky(context: JobContext, key: str) -> None:
        if context.job.attempts == 0:
            events.record("end1", key)
            raise RuntimeError("planned first-attempt failure")
        events.record("start2", key)

    return app


def _state(args: Args) -> tuple[str, EventLog]:
    dsn, _, events_path = args.state.partition("|")
    return dsn, EventLog(Path(events_path))


# ---------------------------------------------------------------------- worker


async def _run_worker(args: Args) -> None:
    dsn, events = _state(args)
    app = build_app(dsn, events)
    async with app.open_async():
        await app.run_worker_async(
            queues=[QUEUE],
            concurrency=args.concurrency,
            fetch_job_polling_interval=args.poll,
            install_signal_handlers=True,
        )


def worker(args: Args) -> JsonDict:
    asyncio.run(_run_worker(args))
    return {}


# -------------------------------------------------------------------- app side


async def _count_succeeded(app: App, task_name: str) -> int:
    row = await app.connector.execute_query_one_async(
        "SELECT count(*) AS c FROM procrastinate_jobs "
        "WHERE status = 'succeeded' AND task_name = %(task)s",
        task=task_name,
    )
    return int(row["c"])


async def _wait_count(app: App, target: int) -> None:
    """Poll until ``target`` noop jobs succeeded (callers bound it with a timeout)."""
    while True:
        if await _count_succeeded(app, "noop") >= target:
            return
        await asyncio.sleep(common.OBSERVE_INTERVAL_S)


async def _wait_event(events: EventLog, key: str) -> None:
    """Poll the event file until attempt 2 of ``key`` started (bounded by callers)."""
    while True:
        if events.has("start2", key):
            return
        await asyncio.sleep(common.OBSERVE_INTERVAL_S)


async def bench_noop(app: App, args: Args) -> JsonDict:
    noop = app.tasks["noop"]
    await noop.defer_async()  # warm-up: worker is up and listening
    async with asyncio.timeout(30.0):
        await _wait_count(app, 1)
    watch = common.Stopwatch()
    for _ in range(args.n):
        await noop.defer_async()
    enqueue_s = watch.elapsed()
    async with asyncio.timeout(args.timeout):
        await _wait_count(app, args.n + 1)
    out = common.throughput(args.n, watch.elapsed())
    out.update(
        enqueue_s=round(enqueue_s, 4),
        concurrency=args.concurrency,
        poll_s=args.poll,
        worker="procrastinate worker subprocess (async tasks)",
    )
    return out


async def bench_backoff(app: App, args: Args, events: EventLog) -> JsonDict:
    flaky = app.tasks["flaky"]
    rng = random.Random(1234)
    keys = [f"s{i}" for i in range(args.n)]
    for key in keys:
        await asyncio.sleep(rng.uniform(0.0, args.gap))  # de-phase from the poller
        await flaky.defer_async(key=key)
        async with asyncio.timeout(30.0):
            await _wait_event(events, key)
    out = common.lateness_summary(common.backoff_lateness(events.read(), keys))
    out.update(
        delay_s=common.BACKOFF_DELAY_S,
        poll_s=args.poll,
        mechanism="BaseRetryStrategy -> RetryDecision(retry_in={'milliseconds': 250})",
        note=(
            "RetryStrategy(wait=...) takes whole seconds (int); 250 ms needs a "
            "custom BaseRetryStrategy. Retried jobs are picked up by the "
            "fetch_job_polling_interval poll, not by NOTIFY"
        ),
    )
    return out


async def _bench_async(args: Args, dsn: str, events: EventLog) -> JsonDict:
    app = build_app(dsn, events)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        state = f"{dsn}|{events.path}"
        argv = common.worker_argv(MODULE, args, state)
        with common.worker_process(argv) as proc:
            if args.workload == "noop":
                out = await bench_noop(app, args)
            else:
                out = await bench_backoff(app, args, events)
            common.ensure_alive(proc)
    return out


def bench(args: Args) -> JsonDict:
    if args.workload == "steps":
        return common.unsupported(PEER, args, "procrastinate has jobs, not workflow steps")
    if args.backend != "postgres":
        return common.unsupported(PEER, args, "procrastinate requires PostgreSQL")
    result = common.base_result(PEER, args, "procrastinate")
    with common.temp_dir("procrastinate") as tmp, common.pg_database("bench_procrastinate") as dsn:
        result.update(asyncio.run(_bench_async(args, dsn, EventLog(tmp / "events.jsonl"))))
        sync = common.pg_setting(dsn, "synchronous_commit")
        result["durability"] = f"synchronous_commit={sync} (server default)"
    return result


def main(argv: list[str] | None = None) -> int:
    return common.run_main(PEER, "postgres", bench, worker, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
