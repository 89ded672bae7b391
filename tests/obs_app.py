"""The app a `tiers worker` process runs in tests/test_observability.py: a workflow of
three steps (the second fails once), traced with the OpenTelemetry SDK, its spans
written as JSON lines to the file TIERS_OBS_SPANS names.

`python -m retrier worker tests.obs_app:workflows` builds it on TIERS_OBS_DB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import RetryBehavior, Workpool


def build(url: str, spans_file: str | None = None) -> WorkflowManager:
    retrier = Retrier(url, metrics=True)
    if spans_file:
        retrier.enable_tracing(file_tracer_provider(spans_file))
    pool = Workpool(
        retrier, "obs-steps", max_parallelism=4, retry_actions_by_default=True,
        default_retry_behavior=RetryBehavior(max_attempts=3, initial_backoff_ms=20, base=2),
    )
    workflows = WorkflowManager(pool)
    failed_once: set[str] = set()

    @retrier.action(name="obs.add")
    def add(a: int, b: int) -> int:
        return a + b

    @retrier.action(name="obs.flaky")
    def flaky(key: str) -> str:
        if key not in failed_once:
            failed_once.add(key)
            raise RuntimeError("flaky, once")
        return key

    @workflows.define(name="obs.flow")
    async def flow(ctx: WorkflowContext, key: str) -> int:
        x = await ctx.step("add", add, {"a": 1, "b": 2})
        await ctx.step("flaky", flaky, {"key": key})
        return int(await ctx.step("add-again", add, {"a": x, "b": 10}))

    return workflows


def file_tracer_provider(path: str) -> Any:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with open(path, "a") as out:
                for s in spans:
                    ctx = s.get_span_context()
                    assert ctx is not None
                    out.write(json.dumps({
                        "name": s.name,
                        "trace_id": f"{ctx.trace_id:032x}",
                        "span_id": f"{ctx.span_id:016x}",
                        "parent_id": None if s.parent is None else f"{s.parent.span_id:016x}",
                        "pid": os.getpid(),
                        "attributes": dict(s.attributes or {}),
                    }) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    return provider


if "TIERS_OBS_DB" in os.environ:
    workflows = build(os.environ["TIERS_OBS_DB"], os.environ.get("TIERS_OBS_SPANS"))
