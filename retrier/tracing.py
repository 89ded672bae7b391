"""OpenTelemetry tracing of a Retrier (the `tracing` extra: `opentelemetry-api`).

    retrier.enable_tracing()            # the global TracerProvider, or pass your own

Spans: `tiers enqueue <fn>` around `run()`/`enqueue()` inside a recorded trace (outside
one, a run's first attempt starts its trace), `tiers attempt <fn>` for each
attempt, `tiers on_complete <handler>`, `tiers workflow <name>` for each pass of a
workflow's driver and `tiers step <name>` for its steps. A run stores the W3C
traceparent of the context that enqueued it, so its attempts, in whichever process
runs them, are children of that context: one trace from a web request to the last
step of the workflow it started. A run enqueued outside any trace stores its first
attempt's context instead, when that attempt is recorded and the run goes on (a
retry, an on_complete): one trace per run either way. Configure an SDK (exporter,
sampler) as usual; with the API alone every span is a no-op.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TracerProvider,
)
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
        return traceparent(trace.get_current_span().get_span_context())

    def context_of(self, span: Span) -> str | None:
        """A span's context as a traceparent (None if it has no valid one: the API
        without an SDK)."""
        return traceparent(span.get_span_context())

    def recording(self) -> bool:
        """Whether the current span is recorded (a sampled span of an SDK)."""
        return trace.get_current_span().is_recording()

    def span(
        self,
        name: str,
        *,
        parent: str | None = None,
        kind: str = "internal",
        attributes: dict[str, Any] | None = None,
        errors: bool = True,
    ) -> CurrentSpan:
        """A current span (a context manager giving the span); its parent is `parent`
        (a stored traceparent) if given, else the current context. `errors=False`:
        an exception through it (a workflow suspending) is not recorded as the
        span's error."""
        return CurrentSpan(self, name, parent, _KINDS[kind], _clean(attributes), errors)

    def parent_context(self, parent: str) -> otel_context.Context:
        """The context of a stored traceparent (an empty one if it is not valid)."""
        sc = _parse(parent)
        if sc is None:  # not the plain version-00 form: the propagator judges it
            return self.propagator.extract({"traceparent": parent})
        # On an empty context, as the propagator's extract: nothing else of the
        # current context (baggage...) is carried into the span.
        return trace.set_span_in_context(NonRecordingSpan(sc), otel_context.Context())

    def ended(self, span: Span, kind: str, error: str | None) -> None:
        """Mark an attempt's span with how it ended."""
        span.set_attribute("tiers.outcome", kind)
        if kind in ("failure", "fatal", "interrupted"):
            self.failed(span, error)

    def failed(self, span: Span, error: str | None) -> None:
        span.set_status(Status(StatusCode.ERROR, error))


class CurrentSpan:
    """A span made current while the block runs, ended after it (what the SDK's
    `start_as_current_span` does, in one object instead of three generators: this
    runs twice per run)."""

    __slots__ = ("_attributes", "_errors", "_kind", "_name", "_parent", "_span", "_token",
                 "_tracing")

    def __init__(
        self, tracing: Tracing, name: str, parent: str | None, kind: SpanKind,
        attributes: dict[str, Any] | None, errors: bool,
    ) -> None:
        self._tracing = tracing
        self._name = name
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._errors = errors

    def __enter__(self) -> Span:
        parent = self._parent
        ctx = None if parent is None else self._tracing.parent_context(parent)
        span = self._tracing.tracer.start_span(
            self._name,
            ctx,
            self._kind,
            self._attributes,
            record_exception=self._errors,
            set_status_on_exception=self._errors,
        )
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span, ctx))
        return span

    def __exit__(
        self,
        type_: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        try:
            otel_context.detach(self._token)
            # As the SDK's use_span: an Exception (not a cancellation) is the span's error.
            if self._errors and isinstance(exc, Exception) and span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            span.end()


def traceparent(sc: SpanContext) -> str | None:
    """The W3C traceparent of a span context (None if it is not valid)."""
    if not sc.is_valid:
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"


_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _parse(value: str) -> SpanContext | None:
    """A version-00 traceparent (what `traceparent` writes) as a remote span context,
    or None for anything else (left to the propagator)."""
    m = _VERSION_00.fullmatch(value)
    if m is None:
        return None
    trace_id, span_id, flags = (int(g, 16) for g in m.groups())
    sc = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return sc if sc.is_valid else None


def _clean(attributes: dict[str, Any] | None) -> dict[str, Any] | None:
    if attributes is None:
        return None
    return {k: v for k, v in attributes.items() if v is not None}
