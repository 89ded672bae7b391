"""SQLite driver connections kept aside for statements that commit alone.

`retrier.run()` enqueues with one INSERT in autocommit mode. Taken from the engine's
pool, each such INSERT also paid the pool's checkout and check-in (reset, events,
bookkeeping) and two PRAGMAs around it to switch SQLite's busy handler off and on
again (see `_sqlite._retrying`): measured, a third of an enqueue's CPU. The
connections here come from the same engine, so they are configured as the pool's
are (WAL, synchronous, its `connect` events), then leave the pool for good with the
busy handler off once: a lone statement waits for the write lock by retrying on our
finer schedule instead.

Spare connections are a stack shared by the process's threads (a connection is in
use by one thread at a time, as with the pool); at most `keep` stay open while
unused. A forked child never touches its parent's connections (SQLite forbids
carrying one across a fork): it leaves them unclosed and opens its own.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator

from sqlalchemy import Engine


class LoneConnections:
    """Driver connections, busy handler off, for statements that commit alone."""

    def __init__(self, engine: Engine, keep: int = 4) -> None:
        self._engine = engine
        self._keep = keep
        self._spare: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._generation = 0  # closing starts a new one: older connections are not kept

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for one statement; one that raised is closed, not kept."""
        if self._pid != os.getpid():  # a forked child: its parent's are not ours
            self._spare, self._pid = [], os.getpid()
        try:
            raw = self._spare.pop()
        except IndexError:
            raw = self._open()
        generation = self._generation
        try:
            yield raw
        except BaseException:
            raw.close()
            raise
        if generation == self._generation and len(self._spare) < self._keep:
            self._spare.append(raw)
        else:
            raw.close()

    def _open(self) -> sqlite3.Connection:
        pooled = self._engine.raw_connection()  # configured by the engine's events
        raw = pooled.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        pooled.detach()  # ours now: the pool forgets it, and opens another when it needs one
        raw.execute("PRAGMA busy_timeout=0")
        return raw

    def close(self) -> None:
        """Close the spare connections; those in use close when they are given back."""
        self._generation += 1
        spare, self._spare = self._spare, []
        if self._pid == os.getpid():
            for raw in spare:
                raw.close()
