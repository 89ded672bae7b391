"""Driver connections kept aside for statements that commit alone.

`retrier.run()` enqueues with one INSERT in autocommit mode. Taken from the engine's
pool, each such INSERT also paid the pool's checkout and check-in (reset, events,
bookkeeping) and a switch of the connection into its lone-statement mode and back
(SQLite: two PRAGMAs turning the busy handler off and on, see `_sqlite._retrying`;
PostgreSQL: autocommit on and off): counted by valgrind, a quarter of an enqueue's
instructions on SQLite and a sixth on PostgreSQL.
The connections here come from the same engine, so they are configured as the
pool's are (its `connect` events: WAL and synchronous, search_path), then leave the
pool for good, switched into that mode once by the dialect's `prepare`.

Spare connections are a stack shared by the process's threads (a connection is in
use by one thread at a time, as with the pool); at most `keep` stay open while
unused, and one given back unusable (`usable` says) is closed. At most `limit` are in
use at once, as the pool bounds its own: a thread past that waits up to `timeout`
seconds, then gets the pool's own TimeoutError. A forked child never
touches its parent's connections, to use or to close them (SQLite forbids carrying
one across a fork; closing a PostgreSQL one would end the parent's session): it
keeps them unused and opens its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout

Raw = TypeVar("Raw")


class LoneConnections(Generic[Raw]):
    """Driver connections, in lone-statement mode, for statements that commit alone."""

    def __init__(
        self,
        engine: Engine,
        kind: type[Raw],
        prepare: Callable[[Raw], None],
        usable: Callable[[Raw], bool],
        *,
        limit: int,
        timeout: float,
        keep: int = 4,
    ) -> None:
        self._engine = engine
        self._kind = kind
        self._prepare = prepare
        self._usable = usable
        self._limit = limit
        self._timeout = timeout
        self._in_use = threading.BoundedSemaphore(limit)
        self._keep = keep
        self._spare: list[Raw] = []
        self._inherited: list[Raw] = []  # a forked child's: its parent's, left alone
        self._pid = os.getpid()
        self._generation = 0  # closing starts a new one: older connections are not kept

    @contextlib.contextmanager
    def connection(self) -> Iterator[Raw]:
        """A connection for one statement, given back after it (closed if unusable)."""
        if self._pid != os.getpid():
            self._inherited += self._spare
            self._spare, self._pid = [], os.getpid()
            self._in_use = threading.BoundedSemaphore(self._limit)  # not the parent's threads'
        in_use = self._in_use
        if not in_use.acquire(timeout=self._timeout):
            raise PoolTimeout(
                f"{self._limit} connections for lone statements in use, none free after "
                f"{self._timeout:.0f} s"
            )
        try:
            raw = self._take()
            generation = self._generation
            try:
                yield raw
            finally:
                self._give_back(raw, generation)
        finally:
            in_use.release()

    def _take(self) -> Raw:
        try:
            return self._spare.pop()  # atomic: another thread may have taken the last
        except IndexError:
            return self._open()

    def _give_back(self, raw: Raw, generation: int) -> None:
        if generation == self._generation and len(self._spare) < self._keep and self._usable(raw):
            self._spare.append(raw)
        else:
            _close(raw)

    def _open(self) -> Raw:
        pooled = self._engine.raw_connection()  # configured by the engine's events
        raw = pooled.driver_connection
        assert isinstance(raw, self._kind)
        pooled.detach()  # ours now: the pool forgets it, and opens another when it needs one
        try:
            self._prepare(raw)
        except BaseException:
            _close(raw)
            raise
        return raw

    def close(self) -> None:
        """Close the spare connections; those in use close when they are given back."""
        self._generation += 1
        spare, self._spare = self._spare, []
        if self._pid == os.getpid():
            for raw in spare:
                _close(raw)


def _close(raw: Any) -> None:
    with contextlib.suppress(Exception):  # a broken connection may fail to close: gone anyway
        raw.close()
