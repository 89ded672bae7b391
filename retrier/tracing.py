"""OpenTelemetry tracing of a Retrier (the `tracing` extra: `opentelemetry-api`).

    retrier.enable_tracing()            # the global TracerProvider, or pass your own

Spans: `tiers enqueue <fn>` around `run()`/`enqueue()`, `tiers attempt <fn>` for each
attempt, `tiers on_complete <handler>`, `tiers workflow <name>` for each pass of a
workflow's driver and `tiers step <name>` for its steps. A run stores the W3C
traceparent of the context that enqueued it, so its attempts, in whichever process
runs them, are children of that context: one trace from a web request to the last
step of the workflow it started. Configure an SDK (exporter, sampler) as usual; with
the API alone every span is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["Tracing"]

_KINDS = {
    "internal": SpanKind.INTERNAL,
    "producer": SpanKind.PRODUCER,
    "consumer": SpanKind.CONSUMER,
}


class Tracing:
    """The tracer of one Retrier, and the W3C propagator its runs' contexts use."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("durable-tiers", tracer_provider=tracer_provider)
        self.propagator = TraceContextTextMapPropagator()

    def current(self) -> str | None:
        """The current context as a traceparent (None without a valid span)."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return carrier.get("traceparent")

    @contextmanager
    def span(
        self,
        name: str,
        *,
        parent: str | None = None,
        kind: str = "internal",
        attributes: dict[str, Any] | None = None,
        errors: bool = True,
    ) -> Iterator[Span]:
        """A current span; its parent is `parent` (a stored traceparent) if given,
        else the current context. `errors=False`: an exception through it (a
        workflow suspending) is not recorded as the span's error."""
        ctx = None
        if parent is not None:
            ctx = self.propagator.extract({"traceparent": parent})
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            with self.tracer.start_as_current_span(
                name,
                kind=_KINDS[kind],
                attributes=_clean(attributes),
                record_exception=errors,
                set_status_on_exception=errors,
            ) as span:
                yield span
        finally:
            if token is not None:
                otel_context.detach(token)

    def ended(self, span: Span, kind: str, error: str | None) -> None:
        """Mark an attempt's span with how it ended."""
        span.set_attribute("tiers.outcome", kind)
        if kind in ("failure", "fatal", "interrupted"):
            self.failed(span, error)

    def failed(self, span: Span, error: str | None) -> None:
        span.set_status(Status(StatusCode.ERROR, error))


def _clean(attributes: dict[str, Any] | None) -> dict[str, Any] | None:
    if attributes is None:
        return None
    return {k: v for k, v in attributes.items() if v is not None}
