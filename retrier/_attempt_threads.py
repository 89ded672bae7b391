"""The threads that run a worker's `def` actions.

A `def` action cannot run on the event loop, and a thread hop per run through anyio
(`to_thread.run_sync`: a task, cancel scopes, a capacity limiter, a future and a loop
wake-up each) cost a sync no-op more than the rest of its run. Here each thread takes
claimed runs from a queue and does the whole attempt itself (arguments decoded, the
action called, its result encoded); finished attempts gather in a list that the loop
takes in one hop however many finished meanwhile.

The worker holds at most `concurrency` runs, so a thread is started only when every
one is busy, and there are never more than `concurrency` of them.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from ._run_types import Claimed, Outcome

log = logging.getLogger("tiers.worker")

Finished = list[tuple[Claimed, Outcome | None]]


class AttemptThreads:
    """Runs `attempt(c)` on threads of its own; hands `(c, outcome)` pairs to
    `finished` on the event loop (scheduled there by `to_loop`, which is thread-safe).
    An outcome is None if the attempt stopped short or raised past `Exception`."""

    def __init__(
        self,
        attempt: Callable[[Claimed], Outcome | None],
        finished: Callable[[Finished], None],
        to_loop: Callable[[Callable[[], None]], None],
        *,
        on_thread_start: Callable[[], object] = lambda: None,
        name: str = "tiers-attempt",
    ) -> None:
        self._attempt = attempt
        self._finished = finished
        self._to_loop = to_loop
        self._on_thread_start = on_thread_start
        self._name = name
        self._jobs: queue.SimpleQueue[Claimed | None] = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0
        self._done: Finished = []
        self._done_lock = threading.Lock()
        self.running: dict[str, Claimed] = {}
        """The runs on a thread now, by id (read and written on the loop only)."""

    def submit(self, c: Claimed) -> None:
        """Start an attempt of `c` on a thread (called on the loop)."""
        self.running[c.id] = c
        self._busy += 1
        if self._busy > self._threads:
            self._threads += 1
            threading.Thread(
                target=self._serve, name=f"{self._name}-{self._threads}", daemon=True
            ).start()
        self._jobs.put(c)

    def close(self) -> None:
        """Let the threads end once the attempts they run are done (none waits)."""
        for _ in range(self._threads):
            self._jobs.put(None)
        self._threads = 0

    def _serve(self) -> None:
        self._on_thread_start()
        while (c := self._jobs.get()) is not None:
            outcome: Outcome | None = None
            try:
                outcome = self._attempt(c)
            except BaseException:  # SystemExit or the like, raised by the action
                log.exception("the attempt of run %s was cut short", c.id)
            with self._done_lock:
                self._done.append((c, outcome))
                first = len(self._done) == 1
            if first:  # one hop for whatever finishes before the loop takes them
                self._to_loop(self._take_done)

    def _take_done(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        self._busy -= len(done)
        for c, _ in done:
            del self.running[c.id]
        self._finished(done)
