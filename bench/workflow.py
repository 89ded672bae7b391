"""Workflow benchmarks: per-step overhead and concurrent workflow throughput.

    python -m bench.workflow                        # SQLite and PostgreSQL
    python -m bench.workflow --db sqlite --steps 1000 --workflows 1000

1. One workflow of N sequential no-op steps (default 1,000): ms per step, measured
   from start to completion through an in-process worker.
2. M concurrent 5-step workflows (default 1,000): workflows per second, and (Linux)
   the bytes the process wrote and read per workflow (/proc/self/io: SQLite's WAL
   and database file, its checkpoints included; on PostgreSQL only the client's
   sockets), and its CPU time per workflow; on PostgreSQL also the server's (the CPU
   of every `postgres` process of this machine, so run it beside a local server with
   nothing else to do).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.throughput import fresh_database
from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool


def build(url: str, durability: str = "normal") -> tuple[Retrier, WorkflowManager]:
    retrier = Retrier(url, concurrency=64, durability=durability)  # type: ignore[arg-type]
    pool = Workpool(retrier, f"bench-{uuid.uuid4().hex[:6]}", max_parallelism=200)
    workflows = WorkflowManager(pool)

    @retrier.action(name="noop")
    async def noop(i: int) -> int:
        return i

    @workflows.define(name="sequential")
    async def sequential(ctx: WorkflowContext, n: int) -> int:
        for i in range(n):
            await ctx.step("s", noop, {"i": i})
        return n

    @workflows.define(name="five")
    async def five(ctx: WorkflowContext) -> int:
        for i in range(5):
            await ctx.step("s", noop, {"i": i})
        return 5

    return retrier, workflows


def bench_sequential(workflows: WorkflowManager, steps: int) -> float:
    t = time.perf_counter()
    wf_id = workflows.start("sequential", {"n": steps})
    workflows.wait(wf_id, timeout=600)
    return (time.perf_counter() - t) * 1000 / steps


def bench_concurrent(workflows: WorkflowManager, count: int) -> float:
    t = time.perf_counter()

    async def start_all() -> list[str]:
        return [await workflows.start_async("five") for _ in range(count)]

    ids = asyncio.run(start_all())
    workflows.wait_all(ids, timeout=600)
    return count / (time.perf_counter() - t)


def process_io() -> dict[str, int]:
    """This process's I/O counters so far (Linux; empty elsewhere)."""
    path = Path("/proc/self/io")
    if not path.exists():
        return {}
    pairs = (line.split(": ") for line in path.read_text().splitlines() if line)
    return {key: int(value) for key, value in pairs}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu_s() -> float:
    """CPU seconds of this machine's `postgres` processes so far (those alive now)."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if (proc.info["name"] or "").startswith("postgres"):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total


def sequential_ms_per_step(kind: str, steps: int, durability: str = "normal") -> float:
    """ms per step of one workflow of `steps` sequential no-op steps, on a fresh database."""
    return _on_fresh_database(kind, durability, bench_sequential, warm_up=50, n=steps)


def concurrent_workflows_per_s(kind: str, count: int, durability: str = "normal") -> float:
    """Workflows/s of `count` concurrent 5-step workflows, on a fresh database."""
    return _on_fresh_database(kind, durability, bench_concurrent, warm_up=20, n=count)


def _on_fresh_database(
    kind: str,
    durability: str,
    bench: Callable[[WorkflowManager, int], float],
    *,
    warm_up: int,
    n: int,
) -> float:
    with fresh_database(kind) as url:
        retrier, workflows = build(url, durability)
        try:
            with retrier:
                bench(workflows, warm_up)
                return bench(workflows, n)
        finally:
            retrier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--workflows", type=int, default=1000)
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for kind in kinds:
        with fresh_database(kind) as url:
            retrier, workflows = build(url)
            with retrier:
                bench_sequential(workflows, 50)  # warm up
                per_step = bench_sequential(workflows, args.steps)
                print(f"{kind}: {args.steps} sequential no-op steps: {per_step:.3f} ms/step")
                io_before, cpu_before, server_before = process_io(), cpu_s(), server_cpu_s()
                rate = bench_concurrent(workflows, args.workflows)
                io_after, cpu_after, server_after = process_io(), cpu_s(), server_cpu_s()
                per = {k: (io_after[k] - io_before[k]) / args.workflows for k in io_after}
                io = (f"; {per['wchar'] / 1024:.0f} KiB written, {per['rchar'] / 1024:.0f} KiB"
                      f" read per workflow" if per.get("wchar") else "")
                cpu_ms = (cpu_after - cpu_before) * 1000 / args.workflows
                server_ms = (server_after - server_before) * 1000 / args.workflows
                server = f"; server CPU {server_ms:.2f} ms" if kind == "postgresql" else ""
                print(f"{kind}: {args.workflows} concurrent 5-step workflows: "
                      f"{rate:.0f} workflows/s; CPU {cpu_ms:.2f} ms per workflow{server}{io}")
            retrier.close()


if __name__ == "__main__":
    main()
