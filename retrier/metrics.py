"""Prometheus metrics of a Retrier (the `metrics` extra: `prometheus_client`).

    retrier.enable_metrics()                  # or Retrier(..., metrics=True)
    app.mount("/metrics", make_asgi_app(retrier))   # FastAPI / Starlette
    # or: tiers worker app:retrier --metrics-port 9100

Counters and histograms are this process's (each worker process exports its own);
the gauges (`tiers_queue_*`, `tiers_workers_live`) are read from the database at
scrape time, so every process reports the same values. Each Retrier has a registry
of its own (`retrier.metrics.registry`), or the one passed to `enable_metrics`.
The names are listed in docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import make_asgi_app as _asgi_app
from prometheus_client import make_wsgi_app as _wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._run_types import Claimed, Outcome

if TYPE_CHECKING:
    from ._retrier import Retrier
    from ._store import Store

__all__ = ["Metrics", "make_asgi_app", "make_wsgi_app", "render", "serve"]

# Seconds: from a millisecond no-op to a long action.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
            300, 1800)
_RUN = ("fn", "queue")


class Metrics:
    """The metrics of one Retrier, in `registry`."""

    def __init__(self, store: Store, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = _RUN) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, labels: tuple[str, ...] = _RUN) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=_BUCKETS)

        self.runs_enqueued = counter("tiers_runs_enqueued", "Runs enqueued by this process.")
        self.runs_started = counter("tiers_runs_started", "Runs whose first attempt started.")
        self.runs_succeeded = counter("tiers_runs_succeeded", "Runs that ended in success.")
        self.runs_failed = counter("tiers_runs_failed", "Runs that failed for good.")
        self.runs_canceled = counter(
            "tiers_runs_canceled", "Runs canceled by this process (fn is empty for a pool's "
            "cancel_all)."
        )
        self.attempts = counter(
            "tiers_attempts", "Attempts ended, by outcome.", ("fn", "queue", "outcome")
        )
        self.retries = counter("tiers_retries", "Failed attempts that will be retried.")
        self.handler_failures = counter(
            "tiers_on_complete_failures", "on_complete handlers that raised.", ("handler",)
        )
        self.start_delay = histogram(
            "tiers_run_start_delay_seconds",
            "From when a run was due (enqueued, its run_at, or its backoff's end) to the "
            "start of its attempt.",
        )
        self.attempt_duration = histogram(
            "tiers_attempt_duration_seconds", "How long attempts took."
        )
        self.step_duration = histogram(
            "tiers_workflow_step_duration_seconds",
            "How long workflow steps run inline by their driver took.",
            ("workflow", "fn"),
        )
        self.workflow_duration = histogram(
            "tiers_workflow_duration_seconds",
            "From a workflow's start to its end.",
            ("workflow", "state"),
        )
        self.steps_replayed = counter(
            "tiers_workflow_steps_replayed",
            "Workflow calls answered from the journal on replay.",
            ("workflow",),
        )
        self.steps_executed = counter(
            "tiers_workflow_steps_executed", "Workflow steps started.", ("workflow",)
        )
        self.registry.register(DatabaseCollector(store))

        # The labelled series in use, by (metric, *label values): `labels()` takes a
        # lock and hashes its arguments on every call, and these are hit per run.
        # (Do not `remove()` or `clear()` the library's metrics: a cached series
        # would go on counting outside the registry.)
        self._series: dict[tuple[Any, ...], Any] = {}

    def series(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached."""
        key = (metric, *labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    # -- what the engine reports -------------------------------------------------------

    def enqueued(self, fn: str, queue: str, count: int = 1) -> None:
        self.series(self.runs_enqueued, fn, queue).inc(count)

    def attempt_started(self, c: Claimed) -> None:
        if c.attempts == 1:
            self.series(self.runs_started, c.fn, c.queue).inc()
        if c.due_ms is not None:
            delay = max(0, c.started_ms - c.due_ms) / 1000
            self.series(self.start_delay, c.fn, c.queue).observe(delay)

    def attempt_ended(self, fn: str, queue: str, kind: str, seconds: float) -> None:
        self.series(self.attempts, fn, queue, kind).inc()
        self.series(self.attempt_duration, fn, queue).observe(seconds)

    def runs_recorded(self, ends: Iterable[tuple[Outcome, bool]]) -> None:
        """Count how recorded outcomes ended their runs (`ended`: for good), one
        increment per series for the whole batch."""
        counts: dict[tuple[Counter, str, str], int] = {}
        for o, ended in ends:
            if o.kind == "success":
                if not ended:
                    continue
                metric = self.runs_succeeded
            elif o.kind == "failure" or o.kind == "fatal":
                metric = self.runs_failed if ended else self.retries
            else:
                continue
            key = (metric, o.fn, o.queue)
            counts[key] = counts.get(key, 0) + 1
        for (metric, fn, queue), n in counts.items():
            self.series(metric, fn, queue).inc(n)

    def run_recorded(self, o: Outcome, ended: bool) -> None:
        self.runs_recorded([(o, ended)])

    def canceled(self, fn: str, queue: str, count: int = 1) -> None:
        self.series(self.runs_canceled, fn, queue).inc(count)

    def handler_failed(self, handler: str) -> None:
        self.series(self.handler_failures, handler).inc()


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape: the same from any process."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        return []  # no reads at registration: collect() is only called by a scrape

    def collect(self) -> Iterator[Metric]:
        g = self.store.gauges()
        pending = GaugeMetricFamily(
            "tiers_queue_pending", "Pending runs per queue (due or scheduled).", labels=["queue"]
        )
        running = GaugeMetricFamily(
            "tiers_queue_running", "Running runs per queue.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "tiers_queue_oldest_due_age_seconds",
            "Age of the oldest run that is due and not started, per queue.",
            labels=["queue"],
        )
        cap = GaugeMetricFamily(
            "tiers_queue_max_parallelism", "A pool's cap (queues that have one).",
            labels=["queue"],
        )
        for queue, n in sorted(g.pending.items()):
            pending.add_metric([queue], n)
        for queue, n in sorted(g.running.items()):
            running.add_metric([queue], n)
        for queue, age_ms in sorted(g.oldest_due_age_ms.items()):
            oldest.add_metric([queue], age_ms / 1000)
        for queue, n in sorted(g.max_parallelism.items()):
            cap.add_metric([queue], n)
        yield pending
        yield running
        yield oldest
        yield cap
        yield GaugeMetricFamily(
            "tiers_workers_live", "Workers alive (heartbeat within 3 leases).",
            value=g.live_workers,
        )


def _metrics(retrier: Retrier) -> Metrics:
    metrics = retrier.telemetry.metrics
    if metrics is None:
        metrics = retrier.enable_metrics()
    return metrics


def render(retrier: Retrier) -> bytes:
    """The metrics page (Prometheus text format), e.g. for a route of your own;
    enables metrics if they are off."""
    return generate_latest(_metrics(retrier).registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def make_asgi_app(retrier: Retrier) -> Callable[..., Any]:
    """An ASGI app serving the metrics page: `app.mount("/metrics", ...)`."""
    return _asgi_app(_metrics(retrier).registry)


def make_wsgi_app(retrier: Retrier) -> Callable[..., Any]:
    """A WSGI app serving the metrics page (Flask, Django, any WSGI server)."""
    return _wsgi_app(_metrics(retrier).registry)


def serve(retrier: Retrier, port: int, addr: str = "0.0.0.0") -> Any:
    """Serve the metrics page on `addr:port` from a daemon thread (what
    `tiers worker --metrics-port` does); returns the server (`.shutdown()`)."""
    server, _thread = start_http_server(port, addr, registry=_metrics(retrier).registry)
    return server
