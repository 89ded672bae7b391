"""Telemetry of one Retrier: its metrics and its tracing, each None until enabled.

Everything that observes work goes through a `Telemetry`; the hot path pays one
`if telemetry.active` while both are off. Logging of state changes is not here: it
is always on (`_log.py`), at levels chosen so a healthy run costs nothing visible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._log import run_extra
from ._run_types import Claimed, Delivery, Outcome, Recorded

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .metrics import Metrics
    from .tracing import Tracing

log = logging.getLogger("tiers.worker")


class Telemetry:
    """The metrics and tracing of one Retrier (never process-global)."""

    __slots__ = ("active", "metrics", "tracing")

    def __init__(self) -> None:
        self.metrics: Metrics | None = None
        self.tracing: Tracing | None = None
        self.active = False

    def set(self, *, metrics: Metrics | None = None, tracing: Tracing | None = None) -> None:
        if metrics is not None:
            self.metrics = metrics
        if tracing is not None:
            self.tracing = tracing
        self.active = self.metrics is not None or self.tracing is not None

    # -- enqueue -------------------------------------------------------------------------

    def inserted(self, rows: list[dict[str, Any]]) -> None:
        """Runs about to be inserted (the store's hook): stamp the current trace
        context on those without one, and count them."""
        tracing = self.tracing
        if tracing is not None:
            trace = tracing.current()
            if trace is not None:
                for row in rows:
                    if row.get("trace") is None:
                        row["trace"] = trace
        metrics = self.metrics
        if metrics is not None:
            if len(rows) == 1:
                metrics.enqueued(rows[0]["fn"], rows[0]["queue"] or "")
                return
            counts: dict[tuple[str, str], int] = {}
            for row in rows:
                key = (row["fn"], row["queue"] or "")
                counts[key] = counts.get(key, 0) + 1
            for (fn, queue), n in counts.items():
                metrics.enqueued(fn, queue, n)

    def enqueue_span(self, fns: Sequence[str]) -> Any:
        """A span around an enqueue (`Retrier.submit`) made in a recorded trace, or
        nothing.

        Outside a recorded trace there is none: with no current span (a script, a
        cron tick) the run stores no context and its first attempt starts a trace
        (stored when it is recorded, if a retry or an on_complete follows: `attempt`);
        under a span that is not sampled, the run stores that span's context, so its
        attempts are not sampled either. A root enqueue span costs the enqueuing
        thread a sampled span per run for a trace holding nothing but that run, and
        in a flood of enqueues that CPU slows the enqueuer many times over
        (docs/observability.md, Overhead)."""
        if self.tracing is None or not self.tracing.recording():
            return nullcontext()
        name = f"tiers enqueue {fns[0]}" if len(set(fns)) == 1 else "tiers enqueue"
        return self.tracing.span(name, kind="producer", attributes={"tiers.runs": len(fns)})

    # -- attempts ------------------------------------------------------------------------

    async def attempt(self, c: Claimed, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """One attempt, observed: counted and timed, in a span whose parent is the
        context that enqueued the run (another process's, often).

        A run with no stored context (enqueued outside any trace) has its attempt's
        span start a trace (or join the current context's); if the run goes on after
        this attempt (a retry, an on_complete, handed back), the outcome carries that
        span's context for the record to store as the run's, so what follows is in
        the same trace. A plain success needs none (nothing follows), and is spared
        the formatting. An unsampled context is carried too: the sampler decided
        once for the whole trace."""
        metrics = self.metrics
        if metrics is not None:
            metrics.attempt_started(c)
        tracing = self.tracing
        if tracing is None:
            return await _timed(c, call, metrics, None, None)
        with tracing.span(
            f"tiers attempt {c.fn}",
            parent=c.trace,
            kind="consumer",
            attributes={
                "tiers.run_id": c.id,
                "tiers.fn": c.fn,
                "tiers.attempt": c.attempts,
                "tiers.queue": c.queue,
            },
        ) as span:
            outcome = await _timed(c, call, metrics, tracing, span)
        if c.trace is None and (c.on_complete is not None or outcome.kind != "success"):
            trace = tracing.context_of(span)
            if trace is not None:
                return replace(outcome, trace=trace)
        return outcome

    @contextmanager
    def delivery(self, f: Delivery) -> Iterator[None]:
        """An on_complete call, in a span under the run's enqueuing context (made
        current, so runs it enqueues, a workflow's next driver, join the trace)."""
        if self.tracing is None:
            yield
            return
        with self.tracing.span(
            f"tiers on_complete {f.on_complete}",
            parent=f.trace,
            attributes={"tiers.run_id": f.id, "tiers.fn": f.fn, "tiers.outcome": f.outcome},
        ):
            yield

    def span(self, name: str, attributes: dict[str, Any] | None = None) -> Any:
        """A span in the current context (a workflow, a step), or nothing; an
        exception through it (a workflow suspending) is not taken as its error."""
        if self.tracing is None:
            return nullcontext(None)
        return self.tracing.span(name, attributes=attributes, errors=False)


async def _timed(
    c: Claimed,
    call: Callable[[], Awaitable[Outcome]],
    metrics: Metrics | None,
    tracing: Tracing | None,
    span: Span | None,
) -> Outcome:
    """Run an attempt, then time it and mark its span with how it ended (also when
    it is interrupted)."""
    began = time.perf_counter()
    outcome: Outcome | None = None
    try:
        outcome = await call()
        return outcome
    finally:
        took = time.perf_counter() - began
        kind = "interrupted" if outcome is None else outcome.kind
        if metrics is not None:
            metrics.attempt_ended(c.fn, c.queue, kind, took)
        if span is not None and tracing is not None:
            tracing.ended(span, kind, None if outcome is None else outcome.error)


def outcomes_recorded(
    telemetry: Telemetry, outcomes: Sequence[Outcome], recorded: Recorded
) -> None:
    """After outcomes were stored: log failures (a retry at WARNING, the final failure
    at WARNING with its traceback) and, with metrics, count how runs ended."""
    final: set[str] | None = None
    metrics = telemetry.metrics
    ends: list[tuple[Outcome, bool]] = []
    for o in outcomes:
        if o.kind != "failure" and o.kind != "fatal" and metrics is None:
            continue
        if final is None:
            final = set(recorded.completed)
            final.update(f.id for f in recorded.to_deliver)
            final.difference_update(recorded.stale)
        if o.run_id in recorded.stale:
            continue
        ended = o.run_id in final
        if o.kind == "failure" or o.kind == "fatal":
            extra = run_extra(o.run_id, o.fn, o.attempt, o.queue)
            extra["error"] = o.error
            if ended:
                log.warning(
                    "run %s (%s) failed at attempt %s, for good: %s%s",
                    o.run_id, o.fn, o.attempt, o.error,
                    f"\n{o.traceback.rstrip()}" if o.traceback else "",
                    extra=extra,
                )
            else:
                log.warning(
                    "run %s (%s) attempt %s failed, will retry: %s",
                    o.run_id, o.fn, o.attempt, o.error,
                    extra=extra,
                )
        if metrics is not None:
            ends.append((o, ended))
    if ends and metrics is not None:
        metrics.runs_recorded(ends)
    if log.isEnabledFor(logging.DEBUG):
        for run_id in recorded.completed:
            log.debug("run %s completed", run_id, extra={"run_id": run_id})
