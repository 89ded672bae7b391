"""The durable-tiers app that benchmark worker processes run (`bench.apps:retrier`).

Worker processes read their settings from the environment: TIERS_BENCH_DB (the URL),
TIERS_BENCH_C (concurrency) and TIERS_BENCH_DURABILITY ("full" or "normal", the
library's default). The poll interval is the library's default for the database:
workers are woken by NOTIFY on PostgreSQL and by pings on SQLite, the poll is only a
safety net.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from retrier import Retrier


def build(url: str, *, observe: bool = False, **options: Any) -> Retrier:
    retrier = Retrier(url, **options)
    if observe:
        enable_observability(retrier)

    @retrier.action(name="noop")
    async def noop() -> None:
        return None

    @retrier.action(name="noop_sync")
    def noop_sync() -> None:
        return None

    @retrier.action(name="fail_once")
    def fail_once(key: int, fail: bool) -> None:
        if fail:
            raise RuntimeError("fail once")

    return retrier


def enable_observability(retrier: Retrier) -> None:
    """Metrics, and tracing through the OpenTelemetry SDK (spans sampled at the ratio
    TIERS_BENCH_SAMPLE, default every one, batched to an exporter that drops them):
    what it costs, short of the export."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    ratio = float(os.environ.get("TIERS_BENCH_SAMPLE", "1"))
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    retrier.enable_metrics()
    retrier.enable_tracing(provider)


@cache
def _from_env() -> Retrier:
    concurrency = int(os.environ.get("TIERS_BENCH_C", "16"))
    durability = os.environ.get("TIERS_BENCH_DURABILITY", "normal")
    observe = os.environ.get("TIERS_BENCH_OBSERVE") == "1"
    return build(
        os.environ["TIERS_BENCH_DB"], concurrency=concurrency, durability=durability,
        observe=observe,
    )


def __getattr__(name: str) -> Any:
    if name == "retrier":
        return _from_env()
    raise AttributeError(name)
