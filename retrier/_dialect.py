"""The contract between the store and a database: what differs between SQLite and
PostgreSQL, behind one small interface (`Dialect`), and the helpers both share.

Everything else in the store is plain SQLAlchemy Core shared by both. The dialects
themselves are in `_sqlite` and `_postgres`; `_dialects.open_dialect` picks one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus
from sqlalchemy import Connection, Engine, Insert, Table, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql import ColumnElement, Select

from ._dberrors import connection_lost
from ._errors import DatabaseUnavailable

if TYPE_CHECKING:
    from ._compiled import CompiledWrite

log = logging.getLogger("tiers.store")

# Notification kinds: look for due work; look at your runs' cancel requests. Each is
# only a hint to read the database (anyone who can connect can send one).
WAKE = "wake"
CANCEL = "cancel"

Listener = Callable[[str, str], None]
"""Called with a notification's kind (WAKE or CANCEL) and payload."""

_SENT_AT = "t="


def stamped(kind: str, payload: str) -> str:
    """A WAKE's payload, stamped (where a dialect can) with the machine's monotonic
    time it is sent at, after its commit: a worker whose claim began later has seen
    the runs it announces already (`sent_at`)."""
    return f"{_SENT_AT}{time.monotonic():.6f}" if kind == WAKE and not payload else payload


def sent_at(payload: str) -> float | None:
    """When a stamped WAKE was sent (None: not stamped, as PostgreSQL's are not)."""
    if payload.startswith(_SENT_AT):
        try:
            return float(payload[len(_SENT_AT) :])
        except ValueError:
            return None
    return None


P = ParamSpec("P")
T = TypeVar("T")

# Set while a store call runs on the event loop's own thread (see SQLiteDialect.call):
# there, a write that would have to wait for a lock raises WouldBlock instead.
ON_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar("tiers_on_loop", default=False)


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: the server restarted or dropped the
    connection, the pool was exhausted, the file was locked or full. Not: a constraint
    violated, a statement that is wrong, a bug."""
    if isinstance(exc, DatabaseUnavailable):  # what read() and write() make of those
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.OperationalError) and isinstance(exc.orig, sqlite3.Error):
        # SQLite reports a wrong statement ("no such column": a schema not migrated)
        # as an OperationalError too: only these conditions pass.
        return any(sign in str(exc.orig) for sign in _SQLITE_PASSING)
    return isinstance(
        exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError
    )


_SQLITE_PASSING = ("locked", "busy", "disk I/O error", "disk is full", "unable to open")


def reconnecting(fn: Callable[P, T]) -> Callable[P, T]:
    """Call `fn` once more if its connection turned out dead (the server restarted,
    or dropped it): SQLAlchemy has then discarded the pool's old connections, so the
    second try connects afresh. Only for calls that open their own transaction and
    may safely run twice: a failed first statement on a dead connection did nothing.
    (Cheaper than a ping before every checkout.)"""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (sa_exc.DBAPIError, DatabaseUnavailable) as exc:  # as read/write raise it
            if not connection_lost(exc):
                raise
            log.info("database connection was lost; trying again on a new one")
        return fn(*args, **kwargs)

    return call


class Subscription(Protocol):
    """What `Dialect.subscribe` returns: listening until closed."""

    def close(self) -> None:
        """Stop listening, at once (a listening thread ends soon after)."""
        ...


class NoSubscription:
    """A subscription where notifications cannot arrive."""

    def close(self) -> None:
        pass


class AnnouncementWants(Protocol):
    """What `Dialect.announcement_wants` returns: a worker's wish to hear of new runs."""

    def want(self, wanted: bool) -> None:
        """Wish to hear of new runs, or not; never blocks, thread-safe."""
        ...

    def close(self) -> None:
        """Stop; the wish no longer holds."""
        ...


class AlwaysWanting:
    """Where inserts always announce themselves (SQLite's pings, which cost a
    datagram): no wish to keep."""

    def want(self, wanted: bool) -> None:
        pass

    def close(self) -> None:
        pass


class WouldBlock(Exception):
    """A write on the event loop found the database locked; redo it on a thread."""


class Dialect(Protocol):
    name: str
    engine: Engine
    can_notify: bool
    """Whether `notify` reaches other processes (else they find work by polling)."""
    wake_channel: str
    """Where this database's wake-ups go (its namespace's own channel)."""
    default_poll_interval: timedelta
    """How often an idle worker looks for work by itself: often where other processes
    cannot notify it (SQLite), rarely where they can (a safety net)."""
    update_returning: bool
    """Whether UPDATE ... RETURNING is available (one round trip instead of two)."""
    batch_rowcount: bool
    """Whether an executemany reports how many rows it changed in all."""
    writes_in_cte: bool
    """Whether a statement may write in its WITH clause (PostgreSQL): two dependent
    writes then take one round trip."""
    server_claim: bool
    """Whether claims run as one server-side call (`tiers_claim`, PostgreSQL): the
    locks they take are then held for one round trip."""
    straggler_wait_s: float
    """How long a worker's record waits for the few attempts of a batch still running
    (see `Worker._record_loop`): worth it where a record is a round trip and a commit
    (PostgreSQL), not where it is a local write (SQLite: 0, no wait)."""

    def read(self) -> contextlib.AbstractContextManager[Connection]: ...
    def write(self) -> contextlib.AbstractContextManager[Connection]: ...
    def write_internal(self) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction of the engine's own (claim, record, lease upkeep).

        Losing one of these in a database crash only makes a run execute again,
        which at-least-once execution already allows, so they may commit without
        waiting for the disk where the database supports it.
        """
        ...
    def write_one(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection for a single atomic statement: autocommit where that is faster."""
        ...
    def read_one(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection for a single statement that only reads: autocommit where that
        saves the BEGIN and COMMIT round trips (PostgreSQL: one statement sees one
        snapshot either way)."""
        ...
    def write_internal_one(self) -> contextlib.AbstractContextManager[Connection]:
        """`write_one`, for one of the engine's own statements (see `write_internal`)."""
        ...
    def insert_alone(self, insert: CompiledWrite, row: dict[str, Any]) -> None:
        """Insert one row in a transaction of its own, on the driver's connection
        (`_compiled`); errors as `write_one`'s."""
        ...
    def create_extras(self, conn: Connection) -> None:
        """Dialect-specific schema objects, created with the tables."""
        ...
    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking store function from async code, opening its own transactions."""
        ...
    def dispose(self) -> None: ...
    def checked_out(self) -> int:
        """Connections currently checked out of this dialect's pools."""
        ...
    def lock_for_claim(self, stmt: Select[Any]) -> Select[Any]: ...
    def lock_rows(self, stmt: Select[Any]) -> Select[Any]: ...
    def insert_ignoring(self, table: Table) -> Insert:
        """An INSERT into `table` that skips each row a unique index already holds
        (`ON CONFLICT DO NOTHING`), waiting for a concurrent transaction that holds
        such a row uncommitted to end. Add `.returning(...)` to learn whether a row
        went in (a rowcount may read -1)."""
        ...
    def lock_schema(self, conn: Connection) -> None:
        """Keep other processes from changing the schema until this transaction ends."""
        ...
    def lock_key(self, conn: Connection, key: str) -> None:
        """Serialize transactions that take the same `key` until they end (where
        writers are not serialized already)."""
        ...
    def notify(self, conn: Connection, kind: str, payload: str = "") -> None:
        """Send a WAKE or CANCEL hint to every listening worker, at commit."""
        ...
    def announce(self, kind: str, payload: str = "") -> None:
        """Send a hint now, after a commit this dialect did not see (the caller's own
        transaction, say): a no-op where inserted runs announce themselves (a
        PostgreSQL trigger)."""
        ...
    async def listen(
        self, on_notify: Listener, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Call `on_notify(kind, payload)` for each hint other processes send (from
        the event loop or a thread of the dialect's), until cancelled; first with a
        WAKE with no payload once listening. Where hints cannot arrive
        (`can_notify` False), it only waits to be cancelled."""
        ...
    def announcement_wants(self, on_wanting: Callable[[], None]) -> AnnouncementWants:
        """A worker's wish to hear of new runs. Where announcements cost (PostgreSQL:
        an insert sends a NOTIFY only while some worker wants one, `_pg_wants`), a
        worker that will look at the database soon anyway says it does not;
        `on_wanting` is called (from a thread of the dialect's) each time the wish
        holds again, and the worker must then claim: runs inserted meanwhile were not
        announced. Elsewhere a no-op: inserts always announce themselves."""
        ...

    # -- a higher tier's own notifications (topics) ------------------------------------
    #
    # Apart from the engine's WAKE and CANCEL, which they leave alone: one channel per
    # topic and namespace, for a tier's own "this changed" (the workflow tier's watch).

    topics_notify: bool
    """Whether `notify_topic` reaches `subscribe` in other processes; where it does
    not (SQLite), watchers poll."""

    def topic_notice(self, topic: str, payload: ColumnElement[Any]) -> ColumnElement[Any] | None:
        """An SQL expression that, evaluated in a statement of a transaction, sends
        `payload` on `topic` (lowercase, at most 14 characters: with the namespace
        it names a PostgreSQL channel) when that transaction commits,
        and nothing if it rolls back; None where `topics_notify` is False.

        An expression rather than a call, so that a tier can fold it into a statement
        it runs anyway (a row lock, under a condition such as "someone is watching"):
        a notification costs no extra round trip, and none is sent when nobody
        listens (on PostgreSQL, every notifying commit takes one database-wide lock).
        """
        ...

    def topic_channel(self, topic: str) -> str | None:
        """The server's channel for `topic` in this namespace, for notices sent from
        server-side code (`pg_notify`); None where `topics_notify` is False."""
        ...

    def subscribe(self, topic: str, on_notify: Callable[[str], None]) -> Subscription:
        """Call `on_notify(payload)` (from a thread of the dialect's) for each
        notification on `topic` until the subscription is closed; first with "" once
        listening (to catch up on anything sent before). Where `topics_notify` is
        False nothing is ever called."""
        ...


def partial_index(predicate: str) -> dict[str, Any]:
    """The keyword arguments that make an `Index` partial on every supported backend:
    `Index(name, *columns, **partial_index("state = 'running'"))`."""
    return {f"{backend}_where": text(predicate) for backend in ("sqlite", "postgresql")}


Durability = Literal["full", "normal"]
"""How hard a commit is pressed to disk. `full`: every commit waits for the disk
(SQLite `synchronous=FULL`; PostgreSQL `synchronous_commit=on` for all writes).
`normal` (the default): SQLite `synchronous=NORMAL` in WAL mode (durable if the
process dies; the last commits may be lost if the machine loses power); on
PostgreSQL the engine's own writes (claims, outcomes, leases) commit without waiting
for the disk, so a server crash may forget the last fraction of a second of them:
runs that had finished then run again, as after any lost attempt (at-least-once);
writes in your transactions (enqueues, session handlers' writes) always wait."""
