"""Helpers shared by the test modules."""

from __future__ import annotations

import signal
import subprocess
import threading
from typing import IO, Any

from retrier import Retrier, testing


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
