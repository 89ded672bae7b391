"""CPU that metrics and tracing add to one run, without the database.

    python -m bench.telemetry_cost                 # metrics, tracing, both; every span sampled
    python -m bench.telemetry_cost --sample 0.1    # one trace in ten
    python -m bench.telemetry_cost --in-trace      # runs enqueued inside a span

What a run pays for telemetry, in the calls the engine makes: the enqueue (a span
only inside a recorded trace: `--in-trace` enqueues inside one span, made once) and
the insert hook (traceparent stamped, run counted), then the attempt span (its
parent read back from the traceparent, if any), its metrics and its outcome. The tracer is
the one `bench.throughput --observe` uses (SDK, batched to an exporter that drops
spans). CPU time per run, best of `--repeat` loops: far steadier on a busy machine
than `bench.throughput`, which measures what it adds up to with the database. The
garbage collector's share (spans waiting in the batch processor reach the old
generation) is not in these figures: a small heap is collected quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from contextlib import nullcontext
from functools import partial

from bench.apps import enable_observability
from retrier import Retrier
from retrier._run_types import Claimed, Outcome
from retrier._telemetry import Telemetry


def telemetry(mode: str, directory: str) -> Telemetry:
    retrier = Retrier(f"sqlite:///{directory}/{mode}.db")
    if mode == "metrics":
        retrier.enable_metrics()
    else:
        enable_observability(retrier)
        if mode == "tracing":
            retrier.telemetry.metrics = None
    return retrier.telemetry


def claimed(i: int, trace: str | None) -> Claimed:
    return Claimed(
        id=f"run{i}", fn="noop", args={}, state="running", fence=1, attempts=1, failures=0,
        queue="", owner=None, on_complete=None, context=None, outcome=None, result=None,
        error=None, started_ms=1_000, trace=trace, due_ms=990,
    )


def per_run_us(t: Telemetry, n: int, in_trace: bool = False) -> tuple[float, float]:
    """(enqueue, attempt) CPU per run in µs, the attempt's no-op action excluded."""
    rows = [{"fn": "noop", "queue": None, "trace": None} for _ in range(n)]
    parent = (
        t.tracing.span("request") if in_trace and t.tracing is not None else nullcontext()
    )
    with parent:
        began = time.process_time()
        for i, row in enumerate(rows):
            with t.enqueue_span(["noop"]):
                t.inserted([row])
            _let_the_exporter_run(i)
        enqueue = time.process_time() - began
    runs = [claimed(i, row["trace"]) for i, row in enumerate(rows)]

    async def action(c: Claimed) -> Outcome:
        return Outcome(run_id=c.id, fence=1, kind="success", started_ms=1_000, attempt=1,
                       queue="", fn="noop")

    async def attempts() -> float:
        began = time.process_time()
        for i, c in enumerate(runs):
            await t.attempt(c, partial(action, c))
            _let_the_exporter_run(i)
        observed = time.process_time() - began
        began = time.process_time()
        for i, c in enumerate(runs):
            await action(c)
            _let_the_exporter_run(i)
        return observed - (time.process_time() - began)

    attempt = asyncio.run(attempts())
    return enqueue / n * 1e6, attempt / n * 1e6


def _let_the_exporter_run(i: int) -> None:
    """A pause now and then (no CPU) for the batch processor's thread: a tight loop
    would otherwise fill its queue, and spans it drops cost less than spans it takes."""
    if i % 256 == 255:
        time.sleep(0.001)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sample", type=float, default=1.0, help="the ratio of traces sampled")
    parser.add_argument("--in-trace", action="store_true",
                        help="enqueue inside a span (as a traced web request does)")
    parser.add_argument("--modes", nargs="+", default=["metrics", "tracing", "both"],
                        choices=["metrics", "tracing", "both"])
    args = parser.parse_args(argv)
    os.environ["TIERS_BENCH_SAMPLE"] = str(args.sample)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            t = telemetry(mode, tmp)
            best = min((per_run_us(t, args.n, args.in_trace) for _ in range(args.repeat)), key=sum)
            print(f"{mode:8s} sample {args.sample:g}: enqueue {best[0]:5.1f} µs  "
                  f"attempt {best[1]:5.1f} µs  per run {sum(best):5.1f} µs")


if __name__ == "__main__":
    main()
