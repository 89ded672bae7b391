"""Helpers shared by the test modules."""

from __future__ import annotations

import threading
from typing import Any

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
