"""Celery peer: Redis broker + Redis result backend, worker in a subprocess.

Pool: ``threads`` by default (``--extra prefork`` for the prefork pool).  On a
2-core machine ten prefork children mostly add context switches and IPC for
no-op tasks, while the thread pool keeps one process; both can be measured.

``task_acks_late=True``: a task is acknowledged after it ran, not when a worker
takes it, so a worker that dies mid-task leaves it to be run again (at-least-once,
as the durable peers). What survives a crash of Redis itself depends on Redis's
persistence; the result reports ``appendonly`` / ``appendfsync`` as read from the
server (CONFIG GET).

Every Redis key this run creates carries a unique ``global_keyprefix`` (broker and
result backend), so cleanup deletes exactly those keys.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery.result import AsyncResult, ResultSet

from bench.peers import common
from bench.peers.common import Args, EventLog, JsonDict

PEER = "celery"
MODULE = "bench.peers.celery_peer"
QUEUE = "peers_bench"
POOLS = ("threads", "prefork")


def build_app(prefix: str, events: EventLog) -> Celery:
    app = Celery("peers_bench", broker=common.REDIS_URL, backend=common.REDIS_URL)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=3600,
        task_acks_late=True,  # at-least-once, like the durable peers
    )

    @app.task(name="noop")
    def noop() -> None:
        return None

    @app.task(name="flaky", bind=True, max_retries=1)
    def flaky(self: Task, key: str) -> int:
        if self.request.retries == 0:
            events.record("end1", key)
            raise self.retry(
                countdown=common.BACKOFF_DELAY_S, exc=RuntimeError("planned first-attempt failure")
            )
        events.record("start2", key)
        return 2

    return app


def _pool(args: Args) -> str:
    return args.extra or "threads"


def _state(args: Args) -> tuple[str, EventLog]:
    prefix, _, events_path = args.state.partition("|")
    return prefix, EventLog(Path(events_path))


# ---------------------------------------------------------------------- worker


def worker(args: Args) -> JsonDict:
    prefix, events = _state(args)
    app = build_app(prefix, events)
    app.worker_main(
        argv=[
            "worker",
            "--pool",
            _pool(args),
            "--concurrency",
            str(args.concurrency),
            "--queues",
            QUEUE,
            "--loglevel",
            "WARNING",
            "--hostname",
            f"peers-bench-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return {}


# -------------------------------------------------------------------- app side


@contextlib.contextmanager
def redis_namespace() -> Iterator[str]:
    """Yield a unique key prefix; delete every key under it afterwards."""
    prefix = f"peers-bench-celery-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(common.REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def redis_persistence() -> str:
    """Redis's persistence settings, as the server reports them."""
    client = redis.Redis.from_url(common.REDIS_URL)
    try:
        config = {
            **client.config_get("appendonly"),
            **client.config_get("appendfsync"),
            **client.config_get("save"),
        }
    except redis.RedisError as exc:
        return f"unknown ({exc})"
    finally:
        client.close()
    return ", ".join(f"{k}={v!r}" for k, v in sorted(config.items()))


def bench_noop(app: Celery, args: Args) -> JsonDict:
    noop: Any = app.tasks["noop"]
    watch = common.Stopwatch()
    results: list[AsyncResult] = [noop.delay() for _ in range(args.n)]
    enqueue_s = watch.elapsed()
    ResultSet(results).get(timeout=args.timeout, propagate=True)
    out = common.throughput(args.n, watch.elapsed())
    out.update(
        enqueue_s=round(enqueue_s, 4),
        concurrency=args.concurrency,
        pool=_pool(args),
        worker="celery worker subprocess",
    )
    return out


def bench_backoff(app: Celery, args: Args, events: EventLog) -> JsonDict:
    flaky: Any = app.tasks["flaky"]
    rng = random.Random(1234)
    keys = [f"s{i}" for i in range(args.n)]
    for key in keys:
        common.sample_gap(rng, args.gap)
        flaky.delay(key).get(timeout=30.0)
    out = common.lateness_summary(common.backoff_lateness(events.read(), keys))
    out.update(
        delay_s=common.BACKOFF_DELAY_S, pool=_pool(args), mechanism="self.retry(countdown=0.25)"
    )
    return out


def bench(args: Args) -> JsonDict:
    if args.workload == "steps":
        return common.unsupported(PEER, args, "celery has tasks/canvas, not durable workflow steps")
    if args.backend != "redis":
        return common.unsupported(PEER, args, "this harness runs celery on Redis only")
    if _pool(args) not in POOLS:
        return common.unsupported(PEER, args, f"--extra must be one of {POOLS}")
    result = common.base_result(PEER, args, "celery")
    result["durability"] = redis_persistence()
    with common.temp_dir("celery") as tmp, redis_namespace() as prefix:
        events = EventLog(tmp / "events.jsonl")
        app = build_app(prefix, events)
        argv = common.worker_argv(MODULE, args, f"{prefix}|{events.path}")
        with common.worker_process(argv) as proc:
            app.tasks["noop"].delay().get(timeout=60.0)  # warm-up: worker is consuming
            common.ensure_alive(proc)
            if args.workload == "noop":
                result.update(bench_noop(app, args))
            else:
                result.update(bench_backoff(app, args, events))
        app.close()
    return result


def main(argv: list[str] | None = None) -> int:
    return common.run_main(PEER, "redis", bench, worker, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
