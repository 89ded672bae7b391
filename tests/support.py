"""Helpers shared by the test modules."""

from __future__ import annotations

import signal
import subprocess
import threading
from typing import IO, Any

from retrier import Retrier, testing
from retrier.testing import FakeClock
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool


def drain(retrier: Retrier) -> None:
    """Run everything that is due now, to completion, in a worker without timers
    (`retrier.testing.drain`, the testing mode apps use)."""
    testing.drain(retrier)


class Calls:
    """A thread-safe record of calls."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._lock = threading.Lock()

    def add(self, item: Any) -> None:
        with self._lock:
            self.items.append(item)

    def count(self, item: Any) -> int:
        with self._lock:
            return self.items.count(item)


def stop_processes(procs: list[subprocess.Popen[Any]], logs: list[IO[Any]]) -> None:
    """Stop worker processes as a deploy would (SIGTERM, then SIGKILL after 15 s) and
    close their log files."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    for log in logs:
        log.close()


def shapes_app(
    make_retrier: Any, *, server: bool, concurrency: int | None = None, **pool_options: Any
) -> tuple[Retrier, WorkflowManager]:
    """A retrier on a fake clock with the workflow `steps(n, k=0)`: n steps of
    `shape(i)` (None, text, nested JSON, a number, by i) in the pool "steps" (a cap of
    4 unless told). `server=False`: PostgreSQL's workflows take the Python path, with
    no server-side calls, for comparison."""
    options: dict[str, Any] = {} if concurrency is None else {"concurrency": concurrency}
    retrier = make_retrier(clock=FakeClock(), **options)
    pool = Workpool(retrier, "steps", **{"max_parallelism": 4, **pool_options})
    workflows = WorkflowManager(pool)
    if not server:
        workflows._driver._batches = None

    @retrier.action
    def shape(i: int) -> Any:
        return [None, "text", {"i": i, "nested": [1.5, True, None]}, i][i % 4]

    @workflows.define
    async def steps(ctx: WorkflowContext, n: int, k: int = 0) -> list[Any]:
        return [await ctx.step("s", shape, {"i": i + k}) for i in range(n)]

    return retrier, workflows
