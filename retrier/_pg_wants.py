"""Which PostgreSQL workers want to hear of new runs: a shared advisory lock each one
holds while it does, which the insert trigger tries to take (`WAKE_FUNCTION`).

A NOTIFY is dear: the committing transaction takes a database-wide lock to queue it,
and every listening backend, and every worker, wakes to read it (measured: 1,298
runs/s with one per enqueue, 1,821 without, every process's CPU per run lower). A
worker that records outcomes every few milliseconds needs none: each record claims,
in the same transaction, the runs that are due. So a worker holds the lock (shared,
on a connection of its own) only while it wants announcements: while it has free
slots and no record is coming soon. The trigger sends a NOTIFY only if it cannot take
the lock exclusively, that is if some worker holds it (or another inserting
transaction does: then it notifies, to be safe).

No run is left unannounced. An insert whose trigger took the lock holds it until its
transaction ends; a worker that wants announcements again waits for that lock, and
only then claims (`on_wanting`), in a snapshot that holds every run inserted without
a NOTIFY. An insert after that finds the lock held, and notifies. The worker's poll
stays the safety net (a dropped connection releases the lock; the thread takes it
again, then calls `on_wanting`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tiers.worker")

# The advisory lock's first key (the second: the wake channel's hash); see also
# `_postgres.lock_schema`'s 7364115.
LOCK_CLASS = 7364116

# The trigger on tiers_runs (statement level, with the inserted rows as `new_runs`).
WAKE_FUNCTION = """
CREATE OR REPLACE FUNCTION tiers_notify_wake_v2() RETURNS trigger AS $$
BEGIN
    -- Only claimable rows: a run inserted already running (a workflow's inline step)
    -- would wake every worker for nothing.
    IF EXISTS (SELECT 1 FROM new_runs WHERE state IN ('pending', 'finishing')) THEN
        -- Taken: no worker wants announcements (each would hold it, shared); held
        -- until this transaction ends, so one that starts wanting them waits, then
        -- claims what this one inserted.
        IF NOT pg_try_advisory_xact_lock({lock_class}, hashtext('{channel}')) THEN
            PERFORM pg_notify('{channel}', '');
        END IF;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""

_TAKE = "SELECT pg_advisory_lock_shared(%s, hashtext(%s))"
_GIVE = "SELECT pg_advisory_unlock_shared(%s, hashtext(%s))"
_KEEPALIVE_S = 10.0  # how often a held lock's connection is checked
_RECONNECT_S = 1.0


def wake_function(channel: str) -> str:
    return WAKE_FUNCTION.replace("{channel}", channel).replace("{lock_class}", str(LOCK_CLASS))


class PgWants:
    """One worker's wish to hear of new runs, kept by a thread of its own: `want(True)`
    takes the shared lock (then calls `on_wanting`), `want(False)` gives it back.
    `want` never blocks; the thread catches up with the latest wish."""

    def __init__(self, dsn: str, channel: str, on_wanting: Callable[[], None]) -> None:
        self._dsn = dsn
        self._channel = channel
        self._on_wanting = on_wanting
        self._wished = True
        self._closed = False
        self._changed = threading.Condition()
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="tiers-wants", daemon=True)
        self._thread.start()

    def want(self, wanted: bool) -> None:
        if wanted == self._wished:
            return
        with self._changed:
            self._wished = wanted
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        conn = self._conn
        if conn is not None:  # it may be waiting for the lock behind a long transaction
            try:
                conn.cancel_safe(timeout=1.0)
            except Exception:  # pragma: no cover - best effort; the thread is a daemon
                pass
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        while not self._closed:
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    self._conn = conn
                    self._serve(conn)
                    return
            except Exception as exc:
                if self._closed:
                    return
                log.warning("announcement lock connection lost (%s); reconnecting", exc)
                with self._changed:
                    self._changed.wait(_RECONNECT_S)
            finally:
                self._conn = None

    def _serve(self, conn: Any) -> None:
        args = (LOCK_CLASS, self._channel)
        held = False
        while True:
            with self._changed:
                if self._wished == held and not self._closed:
                    self._changed.wait(_KEEPALIVE_S)
                if self._closed:
                    return
                wished = self._wished
            if wished and not held:
                conn.execute(_TAKE, args)
                held = True
                self._on_wanting()  # claim now: what came in unannounced is visible
            elif held and not wished:
                conn.execute(_GIVE, args)
                held = False
            elif held:
                conn.execute("SELECT 1")  # still connected, so still holding it

