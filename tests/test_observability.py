"""Observability: Prometheus metrics (counters, histograms, gauges read from the
database), OpenTelemetry traces that follow a run from its enqueue to its attempts in
another process, structured logs, and the warning of a wait with no live worker."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from retrier import Completed, Failed, Retrier, Success, WaitTimeout
from retrier._log import JsonFormatter
from retrier.metrics import make_asgi_app, make_wsgi_app, render
from retrier.tracing import traceparent
from tests.obs_app import build

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# -- off by default ------------------------------------------------------------------


def test_telemetry_is_off_unless_asked(retrier: Retrier) -> None:
    assert not retrier.telemetry.active
    assert retrier.store.on_insert is None

    @retrier.action
    def noop() -> None: ...

    with retrier:
        assert retrier.wait(retrier.run(noop), timeout=10) == Completed(Success(None))


# -- metrics -------------------------------------------------------------------------


def test_metrics_count_runs_and_attempts_and_read_gauges_from_the_database(
    make_retrier: Callable[..., Retrier],
) -> None:
    registry = CollectorRegistry()
    retrier = make_retrier(max_failures=2, initial_backoff_ms=10)
    assert retrier.enable_metrics(registry).registry is registry

    @retrier.action(name="m.ok")
    def ok() -> int:
        return 1

    @retrier.action(name="m.bad")
    def bad() -> None:
        raise RuntimeError("always")

    ids = [retrier.run(ok) for _ in range(3)] + [retrier.run(bad)]
    # Gauges come from the database: the runs are pending, no worker is alive.
    assert sample(registry, "tiers_queue_pending", queue="") == 4
    assert sample(registry, "tiers_workers_live") == 0
    assert sample(registry, "tiers_queue_oldest_due_age_seconds", queue="") >= 0
    with retrier:
        retrier.wait_all(ids, timeout=20)
        assert sample(registry, "tiers_workers_live") == 1
    assert sample(registry, "tiers_runs_enqueued_total", fn="m.ok", queue="") == 3
    assert sample(registry, "tiers_runs_started_total", fn="m.ok", queue="") == 3
    assert sample(registry, "tiers_runs_succeeded_total", fn="m.ok", queue="") == 3
    assert sample(registry, "tiers_runs_failed_total", fn="m.bad", queue="") == 1
    assert sample(registry, "tiers_retries_total", fn="m.bad", queue="") == 1
    assert sample(registry, "tiers_attempts_total", fn="m.bad", queue="", outcome="failure") == 2
    assert sample(registry, "tiers_attempt_duration_seconds_count", fn="m.ok", queue="") == 3
    assert sample(registry, "tiers_run_start_delay_seconds_count", fn="m.bad", queue="") == 2
    assert sample(registry, "tiers_queue_pending", queue="") == 0
    page = render(retrier).decode()
    assert "tiers_runs_succeeded_total" in page and "tiers_queue_running" in page

    pending = retrier.run(ok)
    retrier.cancel(pending)
    assert sample(registry, "tiers_runs_canceled_total", fn="m.ok", queue="") == 1


def test_the_metrics_apps_serve_the_page(retrier: Retrier) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    app = Starlette(routes=[Mount("/metrics", app=make_asgi_app(retrier))])
    with TestClient(app) as client:
        got = client.get("/metrics/")
    assert got.status_code == 200 and "tiers_workers_live" in got.text

    seen: list[str] = []
    body = make_wsgi_app(retrier)(
        {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
        lambda status, headers: seen.append(status),
    )
    assert seen == ["200 OK"] and b"tiers_queue_pending" in b"".join(body)


def test_workflow_metrics(make_retrier: Callable[..., Retrier], db_url: str) -> None:
    workflows = build(db_url)
    retrier = workflows.retrier
    metrics = retrier.telemetry.metrics
    assert metrics is not None
    try:
        with retrier:
            wf = workflows.start("obs.flow", {"key": "k1"})
            assert workflows.wait(wf, timeout=30) == Completed(Success(13))
        r = metrics.registry
        assert sample(r, "tiers_workflow_steps_executed_total", workflow="obs.flow") == 3
        assert sample(r, "tiers_workflow_steps_replayed_total", workflow="obs.flow") >= 1
        assert sample(r, "tiers_workflow_duration_seconds_count", workflow="obs.flow",
                      state="completed") == 1
        assert sample(r, "tiers_workflow_step_duration_seconds_count", workflow="obs.flow",
                      fn="obs.add") >= 1
    finally:
        retrier.close()


# -- tracing -------------------------------------------------------------------------


def test_an_attempt_is_a_child_of_the_request_that_enqueued_it(
    retrier: Retrier, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    retrier.enable_tracing(provider)

    @retrier.action(name="t.hello")
    def hello(name: str) -> str:
        return f"hi {name}"

    @retrier.on_complete(name="t.done")
    def done(run_id: str, result: Any, context: Any) -> None: ...

    with provider.get_tracer("test").start_as_current_span("request") as request:
        run_id = retrier.run(hello, {"name": "x"}, on_complete=done)
    assert retrier.store.get(run_id).trace is not None
    with retrier:
        retrier.wait(run_id, timeout=10)
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    enqueue, attempt = by_name["tiers enqueue t.hello"], by_name["tiers attempt t.hello"]
    handler = by_name["tiers on_complete t.done"]
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in (enqueue, attempt, handler)} == {trace_id}
    assert enqueue.parent is not None and enqueue.parent.span_id == request.context.span_id
    assert attempt.parent is not None and attempt.parent.span_id == enqueue.context.span_id
    assert handler.parent is not None and handler.parent.span_id == enqueue.context.span_id
    assert attempt.attributes is not None and attempt.attributes["tiers.run_id"] == run_id


@pytest.mark.anyio
async def test_workflows_started_together_each_keep_their_callers_trace(
    make_retrier: Callable[..., Retrier], spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Starts that share a group commit (`start_async`) each stamp their own caller's
    trace on their driver run: a grouped call runs in its caller's context."""
    import asyncio

    from sqlalchemy import select

    from retrier._tables import runs
    from workflow import WorkflowContext, WorkflowManager
    from workpool import Workpool

    provider, _ = spans
    retrier = make_retrier()
    retrier.enable_tracing(provider)
    workflows = WorkflowManager(Workpool(retrier, "traced", max_parallelism=2))

    @workflows.define(name="one")
    async def one(ctx: WorkflowContext) -> int:
        return 1

    tracer = provider.get_tracer("test")

    async def start_in_a_request(i: int) -> tuple[str, str]:
        with tracer.start_as_current_span(f"request {i}") as request:
            workflow_id = await workflows.start_async(one)
        return workflow_id, format(request.get_span_context().trace_id, "032x")

    started = await asyncio.gather(*(start_in_a_request(i) for i in range(10)))
    with retrier.engine.connect() as conn:
        rows = conn.execute(
            select(runs.c.args, runs.c.trace).where(runs.c.fn.like("tiers.workflow.drive:%"))
        ).all()
    stamped = {r.args["workflow_id"]: r.trace for r in rows}
    assert len(stamped) == 10
    for workflow_id, trace_id in started:
        assert stamped[workflow_id] is not None
        assert stamped[workflow_id].split("-")[1] == trace_id, (workflow_id, stamped)


@pytest.mark.anyio
async def test_runs_enqueued_together_each_keep_their_callers_trace(
    retrier: Retrier, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """`run_async` calls that share a group commit each stamp their own request's trace."""
    import asyncio

    provider, _ = spans
    retrier.enable_tracing(provider)

    @retrier.action(name="t.work")
    async def work(i: int) -> int:
        return i

    tracer = provider.get_tracer("test")

    async def enqueue_in_a_request(i: int) -> tuple[str, str]:
        with tracer.start_as_current_span(f"request {i}") as request:
            run_id = await retrier.run_async(work, {"i": i})
        return run_id, format(request.get_span_context().trace_id, "032x")

    enqueued = await asyncio.gather(*(enqueue_in_a_request(i) for i in range(10)))
    for run_id, trace_id in enqueued:
        stored = retrier.store.get(run_id).trace
        assert stored is not None and stored.split("-")[1] == trace_id


@pytest.mark.processes
def test_one_trace_from_the_request_to_the_last_step_run_by_another_process(
    db_url: str, tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """The worker is another process, with its own exporter (a file): every span it
    makes for the workflow belongs to the trace of the request that started it."""
    provider, _ = spans
    spans_file = tmp_path / "spans.jsonl"
    workflows = build(db_url)
    workflows.retrier.enable_tracing(provider)
    port = _free_port()
    env = {**os.environ, "TIERS_OBS_DB": db_url, "TIERS_OBS_SPANS": str(spans_file),
           "TIERS_LOG_LEVEL": "WARNING"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "retrier", "worker", "tests.obs_app:workflows",
         "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"],
        cwd=ROOT, env=env,
    )
    try:
        with provider.get_tracer("test").start_as_current_span("POST /orders") as request:
            wf = workflows.start("obs.flow", {"key": "k1"})
        assert workflows.wait(wf, timeout=60) == Completed(Success(13))
        page = _scrape(port)
        assert 'tiers_workflow_steps_executed_total{workflow="obs.flow"} 3.0' in page
        assert "tiers_workers_live 1.0" in page
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        workflows.retrier.close()
    trace_id = f"{request.get_span_context().trace_id:032x}"
    theirs = [json.loads(line) for line in spans_file.read_text().splitlines()]
    assert theirs and {s["pid"] for s in theirs} == {worker.pid}
    names = {s["name"] for s in theirs}
    assert {"tiers workflow obs.flow", "tiers step add[0]", "tiers step flaky[0]",
            "tiers step add-again[0]", "tiers attempt obs.add", "tiers attempt obs.flaky"} <= names
    assert {s["trace_id"] for s in theirs} == {trace_id}
    # Parents resolve within the trace, up to the request in this process.
    ids = {s["span_id"] for s in theirs} | {f"{request.get_span_context().span_id:016x}"}
    assert all(s["parent_id"] in ids for s in theirs)
    last = [s for s in theirs if s["name"] == "tiers step add-again[0]"]
    assert last and last[-1]["trace_id"] == trace_id


def test_a_batch_is_counted_per_action_and_stamped_with_its_enqueue_span(
    retrier: Retrier, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    metrics = retrier.enable_metrics()
    retrier.enable_tracing(provider)

    @retrier.action(name="b.one")
    def one() -> None: ...

    @retrier.action(name="b.two")
    def two() -> None: ...

    batch = [retrier.prepare(one, None), retrier.prepare(two, None),
             retrier.prepare(one, None, queue="q")]
    with provider.get_tracer("test").start_as_current_span("request"):
        retrier.submit(batch)
    enqueue, _request = exporter.get_finished_spans()
    assert enqueue.name == "tiers enqueue" and enqueue.attributes == {"tiers.runs": 3}
    ctx = enqueue.context
    assert {retrier.store.get(r.id).trace for r in batch} == {
        f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    }
    r = metrics.registry
    assert sample(r, "tiers_runs_enqueued_total", fn="b.one", queue="") == 1
    assert sample(r, "tiers_runs_enqueued_total", fn="b.one", queue="q") == 1
    assert sample(r, "tiers_runs_enqueued_total", fn="b.two", queue="") == 1
    retrier.run(one)
    assert sample(r, "tiers_runs_enqueued_total", fn="b.one", queue="") == 2


def test_outcomes_recorded_together_are_each_counted(
    make_retrier: Callable[..., Retrier],
) -> None:
    retrier = make_retrier(max_failures=1)
    metrics = retrier.enable_metrics()

    @retrier.action(name="c.ok")
    def ok() -> None: ...

    @retrier.action(name="c.bad")
    def bad() -> None:
        raise RuntimeError("no")

    # Enqueued before the worker starts: its first batches hold many outcomes.
    ids = [retrier.run(ok) for _ in range(30)] + [retrier.run(bad) for _ in range(5)]
    with retrier:
        retrier.wait_all(ids, timeout=30)
    r = metrics.registry
    assert sample(r, "tiers_runs_succeeded_total", fn="c.ok", queue="") == 30
    assert sample(r, "tiers_attempts_total", fn="c.ok", queue="", outcome="success") == 30
    assert sample(r, "tiers_runs_failed_total", fn="c.bad", queue="") == 5
    assert sample(r, "tiers_retries_total", fn="c.bad", queue="") == 0
    assert sample(r, "tiers_attempt_duration_seconds_count", fn="c.bad", queue="") == 5


def test_unsampled_runs_carry_their_context_and_record_nothing(
    retrier: Retrier,
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    retrier.enable_tracing(provider)

    @retrier.action(name="u.hello")
    def hello() -> str:
        return "hi"

    with provider.get_tracer("test").start_as_current_span("request") as request:
        run_id = retrier.run(hello)
    # No enqueue span under an unsampled one: the run stores the request's context.
    stored = retrier.store.get(run_id).trace
    assert stored is not None and int(stored[-2:], 16) & 1 == 0  # valid, not sampled
    assert stored == traceparent(request.get_span_context())
    with retrier:
        assert retrier.wait(run_id, timeout=10) == Completed(Success("hi"))
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


def test_a_run_enqueued_outside_a_trace_starts_one_at_its_attempt(
    retrier: Retrier, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """No enqueue span without a recorded trace to put it in (a script, a cron
    tick): the run stores no context, its attempt is the root of a trace, and runs
    the attempt enqueues are in that trace."""
    provider, exporter = spans
    retrier.enable_tracing(provider)

    @retrier.action(name="r.child")
    def child() -> None: ...

    @retrier.action(name="r.parent")
    def parent() -> str:
        return retrier.run(child)

    run_id = retrier.run(parent)
    assert retrier.store.get(run_id).trace is None
    assert exporter.get_finished_spans() == ()
    with retrier:
        completed = retrier.wait(run_id, timeout=10)
        assert isinstance(completed.result, Success)
        retrier.wait(completed.result.value, timeout=10)
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    root = by_name["tiers attempt r.parent"]
    enqueue, attempt = by_name["tiers enqueue r.child"], by_name["tiers attempt r.child"]
    assert root.parent is None
    assert {s.context.trace_id for s in (root, enqueue, attempt)} == {root.context.trace_id}
    assert enqueue.parent is not None and enqueue.parent.span_id == root.context.span_id
    assert attempt.parent is not None and attempt.parent.span_id == enqueue.context.span_id


def test_a_run_enqueued_outside_a_trace_is_one_trace_through_retries_and_on_complete(
    retrier: Retrier, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Enqueued outside any trace, no enqueue span: the first attempt is the root of
    the run's trace, stored as the run's context when the attempt is recorded, and the
    retry and the on_complete are its children. A plain success stores nothing."""
    provider, exporter = spans
    retrier.enable_tracing(provider)
    calls: list[int] = []
    handled: list[str] = []

    @retrier.action(name="o.flaky")
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first time")
        return "ok"

    @retrier.action(name="o.plain")
    def plain() -> str:
        return "plain"

    @retrier.on_complete(name="o.done")
    def done(run_id: str, result: Any, context: Any) -> None:
        handled.append(run_id)

    run_id = retrier.run(flaky, on_complete=done, initial_backoff_ms=10, max_failures=3)
    plain_id = retrier.run(plain)
    assert retrier.store.get(run_id).trace is None
    assert exporter.get_finished_spans() == ()  # no enqueue span
    with retrier:
        assert retrier.wait(run_id, timeout=10) == Completed(Success("ok"))
        assert retrier.wait(plain_id, timeout=10) == Completed(Success("plain"))
        deadline = time.monotonic() + 10
        while not handled and time.monotonic() < deadline:
            time.sleep(0.01)
    assert handled == [run_id]
    finished = exporter.get_finished_spans()
    assert not [s for s in finished if s.name.startswith("tiers enqueue")]
    attempts = sorted(
        (s for s in finished if s.name == "tiers attempt o.flaky"),
        key=lambda s: s.attributes["tiers.attempt"] if s.attributes else 0,
    )
    (handler,) = [s for s in finished if s.name == "tiers on_complete o.done"]
    assert len(attempts) == 2
    first, second = attempts
    assert first.parent is None
    assert {s.context.trace_id for s in (first, second, handler)} == {first.context.trace_id}
    assert second.parent is not None and second.parent.span_id == first.context.span_id
    assert handler.parent is not None and handler.parent.span_id == first.context.span_id
    assert retrier.store.get(run_id).trace == traceparent(first.context)
    # Nothing follows a plain success: its run stores no context.
    (plain_attempt,) = [s for s in finished if s.name == "tiers attempt o.plain"]
    assert plain_attempt.parent is None
    assert plain_attempt.context.trace_id != first.context.trace_id
    assert retrier.store.get(plain_id).trace is None


def test_a_run_handed_back_outside_a_trace_stays_in_its_trace(
    retrier: Retrier, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    from retrier import HandBack

    provider, exporter = spans
    retrier.enable_tracing(provider)
    calls: list[int] = []

    @retrier.action(name="o.handed")
    def handed() -> str:  # no on_complete: only the hand-back makes it go on
        calls.append(1)
        if len(calls) == 1:
            raise HandBack(0)
        return "ok"

    run_id = retrier.run(handed)
    with retrier:
        assert retrier.wait(run_id, timeout=10) == Completed(Success("ok"))
    first, second = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert first.attributes is not None and first.attributes["tiers.outcome"] == "released"
    assert first.parent is None
    assert second.parent is not None and second.parent.span_id == first.context.span_id
    assert second.context.trace_id == first.context.trace_id


def test_an_unsampled_root_attempt_keeps_its_retries_unsampled(retrier: Retrier) -> None:
    """The sampler decides once per trace: a run enqueued outside any trace whose
    first attempt was not sampled stores that unsampled context, so its retry and its
    on_complete are not sampled either (rather than each sampled on its own, a trace
    without its start)."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler

    exporter = InMemorySpanExporter()
    roots: list[int] = []

    class FirstRootOff(Sampler):  # a root is not sampled, its children as their parent
        def should_sample(self, parent_context: Any, *args: Any, **kwargs: Any) -> Any:
            from opentelemetry import trace

            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid:
                roots.append(1)
            return ParentBased(ALWAYS_OFF).should_sample(parent_context, *args, **kwargs)

        def get_description(self) -> str:
            return "FirstRootOff"

    provider = TracerProvider(sampler=FirstRootOff())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    retrier.enable_tracing(provider)
    calls: list[int] = []

    @retrier.action(name="o.unsampled")
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first time")
        return "ok"

    @retrier.on_complete(name="o.unsampled_done")
    def done(run_id: str, result: Any, context: Any) -> None: ...

    run_id = retrier.run(flaky, on_complete=done, initial_backoff_ms=10, max_failures=3)
    with retrier:
        assert retrier.wait(run_id, timeout=10) == Completed(Success("ok"))
    stored = retrier.store.get(run_id).trace
    assert stored is not None and int(stored[-2:], 16) & 1 == 0  # valid, not sampled
    assert roots == [1]  # the retry and the on_complete had the stored parent
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


def test_an_error_through_a_span_is_recorded_unless_it_is_not_one(
    retrier: Retrier, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    from opentelemetry.trace import StatusCode

    provider, exporter = spans
    tracing = retrier.enable_tracing(provider)
    with pytest.raises(ValueError), tracing.span("fails"):
        raise ValueError("boom")
    with pytest.raises(ValueError), tracing.span("suspends", errors=False):
        raise ValueError("not an error")
    with pytest.raises(KeyboardInterrupt), tracing.span("interrupted"):
        raise KeyboardInterrupt
    with tracing.span("outer") as outer, tracing.span("inner") as inner:
        assert inner.get_span_context().trace_id == outer.get_span_context().trace_id
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    fails = by_name["fails"]
    assert fails.status.status_code is StatusCode.ERROR
    assert fails.status.description == "ValueError: boom"
    assert [e.name for e in fails.events] == ["exception"]
    for name in ("suspends", "interrupted"):
        assert by_name[name].status.status_code is StatusCode.UNSET
        assert by_name[name].events == ()
    inner_parent = by_name["inner"].parent
    assert inner_parent is not None and inner_parent.span_id == outer.get_span_context().span_id
    # Each span is current only inside its block.
    from opentelemetry import trace

    assert not trace.get_current_span().get_span_context().is_valid


@pytest.mark.parametrize(
    "stored",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # not lower case
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # no trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # no span id
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # a later version
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "garbage",
        "",
    ],
)
def test_a_stored_traceparent_is_read_as_the_w3c_propagator_reads_it(
    retrier: Retrier, stored: str
) -> None:
    from opentelemetry import trace

    tracing = retrier.enable_tracing()
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    token = otel_context.attach(baggage.set_baggage("k", "v"))  # not carried into either
    try:
        ours_ctx = tracing.parent_context(stored)
        theirs_ctx = tracing.propagator.extract({"traceparent": stored})
    finally:
        otel_context.detach(token)
    ours = trace.get_current_span(ours_ctx).get_span_context()
    theirs = trace.get_current_span(theirs_ctx).get_span_context()
    assert ours == theirs and ours.is_remote == theirs.is_remote
    assert baggage.get_all(ours_ctx) == baggage.get_all(theirs_ctx) == {}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as got:
                return str(got.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- logs ----------------------------------------------------------------------------


def test_failures_are_logged_once_recorded(
    make_retrier: Callable[..., Retrier], caplog: pytest.LogCaptureFixture
) -> None:
    retrier = make_retrier(max_failures=2, initial_backoff_ms=10)

    @retrier.action(name="l.bad")
    def bad() -> None:
        raise ValueError("nope")

    caplog.set_level(logging.WARNING, logger="tiers")
    with retrier:
        run_id = retrier.run(bad)
        assert retrier.wait(run_id, timeout=10) == Completed(Failed("ValueError: nope"))
    mine = [r for r in caplog.records if getattr(r, "run_id", None) == run_id]
    assert [r.levelname for r in mine] == ["WARNING", "WARNING"]
    retry, final = mine
    assert "will retry" in retry.getMessage() and "Traceback" not in retry.getMessage()
    assert "for good" in final.getMessage() and "Traceback" in final.getMessage()
    assert (final.fn, final.attempt, final.queue) == ("l.bad", 2, "")  # type: ignore[attr-defined]


def test_json_log_lines_carry_the_extra_fields() -> None:
    record = logging.makeLogRecord({
        "name": "tiers.worker", "levelname": "WARNING", "levelno": logging.WARNING,
        "msg": "run %s failed", "args": ("r1",), "run_id": "r1", "fn": "f", "attempt": 2,
        "queue": "q",
    })
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "run r1 failed" and line["level"] == "WARNING"
    assert (line["run_id"], line["fn"], line["attempt"], line["queue"]) == ("r1", "f", 2, "q")


def test_the_worker_logs_json_lines(db_url: str, tmp_path: Path) -> None:
    script = (
        "import logging\n"
        "from retrier import Retrier\n"
        f"r = Retrier({db_url!r}, max_failures=1)\n"
        "@r.action(name='j.bad')\n"
        "def bad() -> None:\n"
        "    raise ValueError('nope')\n"
        "with r:\n"
        "    r.wait(r.run(bad), timeout=10)\n"
    )
    env = {**os.environ, "TIERS_LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("fn") == "j.bad"]
    assert failed and failed[0]["level"] == "WARNING" and failed[0]["attempt"] == 1
    assert "Traceback" in failed[0]["message"]


# -- a wait with no worker -------------------------------------------------------------


def test_a_wait_with_no_live_worker_warns_once(
    retrier: Retrier, caplog: pytest.LogCaptureFixture
) -> None:
    @retrier.action
    def noop() -> None: ...

    retrier.no_worker_warning_after = 0.1
    run_id = retrier.run(noop)
    caplog.set_level(logging.WARNING, logger="tiers")
    with pytest.raises(WaitTimeout):
        retrier.wait(run_id, timeout=0.6)
    warned = [r for r in caplog.records if "no live worker" in r.getMessage()]
    assert len(warned) == 1
    assert "tiers worker" in warned[0].getMessage() and "with retrier:" in warned[0].getMessage()
    # With a worker alive, none.
    caplog.clear()
    with retrier:
        retrier.wait(run_id, timeout=10)
    assert not [r for r in caplog.records if "no live worker" in r.getMessage()]
