"""tenacity peer: the non-durable floor (in-memory retries, no queue, no storage).

``noop`` calls a no-op through a tenacity-decorated wrapper N times with 10
concurrent callers: asyncio tasks by default, ``--extra threads`` for a
10-thread pool.  ``backoff`` uses ``wait_fixed(0.25)``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tenacity import retry, stop_after_attempt, wait_fixed

from bench.peers import common
from bench.peers.common import Args, JsonDict

PEER = "tenacity"
MODES = ("asyncio", "threads")

_attempts: dict[str, int] = {}
_marks: dict[tuple[str, str], float] = {}


@retry(stop=stop_after_attempt(3), wait=wait_fixed(common.BACKOFF_DELAY_S))
def noop_sync() -> int:
    return 1


@retry(stop=stop_after_attempt(3), wait=wait_fixed(common.BACKOFF_DELAY_S))
async def noop_async() -> int:
    return 1


@retry(stop=stop_after_attempt(2), wait=wait_fixed(common.BACKOFF_DELAY_S), reraise=True)
def flaky(key: str) -> int:
    now = time.time()
    attempt = _attempts.get(key, 0) + 1
    _attempts[key] = attempt
    if attempt == 1:
        _marks[("end1", key)] = time.time()
        raise RuntimeError("planned first-attempt failure")
    _marks[("start2", key)] = now
    return attempt


def _mode(args: Args) -> str:
    return args.extra or "asyncio"


async def _run_async(n: int, concurrency: int) -> None:
    remaining = iter(range(n))

    async def caller() -> None:
        for _ in remaining:  # shared iterator: callers pull the next job
            await noop_async()

    await asyncio.gather(*(caller() for _ in range(concurrency)))


def _run_threads(n: int, concurrency: int) -> None:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(noop_sync) for _ in range(n)]:
            future.result()


def bench_noop(args: Args) -> JsonDict:
    watch = common.Stopwatch()
    if _mode(args) == "asyncio":
        asyncio.run(_run_async(args.n, args.concurrency))
    else:
        _run_threads(args.n, args.concurrency)
    out = common.throughput(args.n, watch.elapsed())
    out.update(concurrency=args.concurrency, mode=_mode(args))
    return out


def bench_backoff(args: Args) -> JsonDict:
    rng = random.Random(1234)
    keys = [f"s{i}" for i in range(args.n)]
    for key in keys:
        common.sample_gap(rng, args.gap)
        flaky(key)
    out = common.lateness_summary(common.backoff_lateness(_marks, keys))
    out.update(delay_s=common.BACKOFF_DELAY_S, mechanism="@retry(wait=wait_fixed(0.25))")
    return out


def bench(args: Args) -> JsonDict:
    if args.workload == "steps":
        return common.unsupported(PEER, args, "tenacity only retries calls; no workflows/steps")
    if _mode(args) not in MODES:
        return common.unsupported(PEER, args, f"--extra must be one of {MODES}")
    result = common.base_result(PEER, args, "tenacity")
    result["note"] = "non-durable floor: in-process, nothing persisted"
    runner = bench_noop if args.workload == "noop" else bench_backoff
    result.update(runner(args))
    return result


def main(argv: list[str] | None = None) -> int:
    return common.run_main(PEER, "memory", bench, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
