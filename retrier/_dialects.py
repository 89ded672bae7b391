"""What differs between SQLite and PostgreSQL, behind one small interface.

Everything else in the store is plain SQLAlchemy Core shared by both.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.sql import Select

from ._dberrors import DRIVER_ERRORS, connection_lost, raise_translated, redact, safe_url
from ._errors import DatabaseUnavailable, InvalidDatabaseURL, InvalidSettings
from ._pg_claim import CLAIM_FUNCTION
from ._pings import Pings

log = logging.getLogger("tiers.store")

_BUSY_TIMEOUT_MS = 30_000
# Pings a SQLite transaction asked for (key in a connection's info), sent at commit.
_PINGS = "tiers_pings"
# How long a store call on the event loop retries a locked SQLite database before it
# waits on a thread instead.
_LOOP_PATIENCE_S = 0.25

# Notification kinds: look for due work; look at your runs' cancel requests. Each is
# only a hint to read the database (anyone who can connect can send one).
WAKE = "wake"
CANCEL = "cancel"

Listener = Callable[[str, str], None]
"""Called with a notification's kind (WAKE or CANCEL) and payload."""

# A namespace becomes a PostgreSQL schema name and part of channel names.
_NAMESPACE = re.compile(r"[a-z_][a-z0-9_]{0,39}")

P = ParamSpec("P")
T = TypeVar("T")

# Set while a store call runs on the event loop's own thread (see SQLiteDialect.call):
# there, a write that would have to wait for a lock raises WouldBlock instead.
_ON_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar("tiers_on_loop", default=False)


# Per event loop: how many PostgreSQL store calls may run on threads at once.
_PG_CALLS: RunVar[anyio.CapacityLimiter] = RunVar("tiers_pg_calls")
_PG_CALL_THREADS = 8


def _pg_call_limiter() -> anyio.CapacityLimiter:
    try:
        return _PG_CALLS.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(_PG_CALL_THREADS)
        _PG_CALLS.set(limiter)
        return limiter


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
    server_claim: bool
    """Whether claims run as one server-side call (`tiers_claim`, PostgreSQL): the
    locks they take are then held for one round trip."""

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
    def write_internal_one(self) -> contextlib.AbstractContextManager[Connection]:
        """`write_one`, for one of the engine's own statements (see `write_internal`)."""
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
    def start_listener(self, on_notify: Listener) -> Callable[[], None] | None: ...


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


def open_dialect(
    url: str,
    namespace: str | None = None,
    *,
    create: bool = True,
    durability: Durability = "normal",
) -> Dialect:
    """The dialect for a database URL, with its engine configured (no connection yet).

    `namespace` keeps this app's tables and notifications apart from any other app's
    in the same PostgreSQL database (a schema of that name, channels of their own).
    With `create=False` (the command line, which only looks), a SQLite file that does
    not exist raises `DatabaseUnavailable` instead of being created. Errors never show
    the URL's password.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        reason = str(exc).replace(url, redact(url))
        raise InvalidDatabaseURL(
            f"cannot parse database URL {redact(url)!r}: {reason}"
        ) from None
    backend = parsed.get_backend_name()
    if durability not in ("full", "normal"):
        raise InvalidSettings(f"durability is 'full' or 'normal', got {durability!r}")
    if namespace is not None and not _NAMESPACE.fullmatch(namespace):
        raise InvalidSettings(
            f"a namespace is 1 to 40 lowercase letters, digits or _, not starting with a "
            f"digit; got {namespace!r}"
        )
    if backend == "sqlite":
        if namespace is not None:
            raise InvalidSettings(
                "namespaces are for PostgreSQL; on SQLite, give each app its own database "
                "file (sqlite:///billing.db, sqlite:///mail.db)"
            )
        path = parsed.database
        if not create and path and path != ":memory:" and not os.path.exists(path):
            raise DatabaseUnavailable(f"no such database: the SQLite file {path!r} does not exist")
        return SQLiteDialect(parsed, durability)
    if backend == "postgresql":
        return PostgresDialect(parsed, namespace, durability)
    raise InvalidDatabaseURL(
        f"unsupported database {backend!r} in {safe_url(parsed)!r}: use "
        f"sqlite:///path/to/file.db or postgresql+psycopg://user@host/dbname"
    )


class SQLiteDialect:
    """One file in WAL mode. Writers take the lock up front with BEGIN IMMEDIATE, so a
    claim's SELECT and UPDATE can never interleave with another process's claim."""

    name = "sqlite"
    wake_channel = ""
    update_returning = True
    batch_rowcount = True
    server_claim = False  # a claim here is in-process already: no round trips to save

    def __init__(self, url: URL, durability: Durability = "normal") -> None:
        if url.drivername != "sqlite" and url.drivername != "sqlite+pysqlite":
            raise InvalidDatabaseURL(f"use the default sqlite driver, not {url.drivername!r}")
        if not url.database or url.database == ":memory:":
            raise InvalidDatabaseURL(
                "an in-memory SQLite database cannot be shared with workers; "
                "give a file: sqlite:///tiers.db"
            )
        self.engine = create_engine(url, pool_size=8, max_overflow=32, pool_timeout=60)
        self.update_returning = bool(self.engine.dialect.update_returning)  # SQLite >= 3.35
        # The engine's own writes (claims, records, workflow steps) have connections
        # of their own, reused most-recent-first: one that wrote last keeps its page
        # cache, which any other connection's write would have invalidated.
        self._internal = create_engine(
            url, pool_size=4, max_overflow=16, pool_timeout=60, pool_use_lifo=True
        )
        for engine in (self.engine, self._internal):
            event.listen(engine, "connect", partial(_sqlite_connect, durability))
            event.listen(engine, "begin", _sqlite_begin)
        # SQLite admits one writer at a time. This process's engine-internal writers
        # queue on a lock of our own, which hands over at once (see write_internal).
        self._write_lock = threading.RLock()
        # Other processes' workers learn of new runs from pings (see _pings), and
        # else by polling: a cheap read.
        self._pings = Pings(url.database) if Pings.available() else None
        self.can_notify = self._pings is not None
        self.default_poll_interval = timedelta(milliseconds=100 if self.can_notify else 25)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(tiers_begin="DEFERRED")
                with conn.begin():
                    yield conn
        except DRIVER_ERRORS as exc:  # unreachable, locked, no tables: a TiersError
            raise_translated(exc, self.engine.url)

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        try:
            with self._transaction(self.engine) as conn:
                yield conn
        except DRIVER_ERRORS as exc:  # unreachable, locked, no tables: a TiersError
            raise_translated(exc, self.engine.url)

    @contextlib.contextmanager
    def _transaction(self, engine: Engine) -> Iterator[Connection]:
        """A write transaction; the pings `notify` asked for in it go once it commits."""
        pings: list[tuple[str, str]] | None = None
        with engine.begin() as conn:
            try:
                yield conn
            finally:
                pings = conn.info.pop(_PINGS, None)
        if pings and self._pings is not None:
            for kind, payload in dict.fromkeys(pings):
                self._pings.send(kind, payload)

    def write_one(self) -> contextlib.AbstractContextManager[Connection]:
        return self.write()

    def write_internal_one(self) -> contextlib.AbstractContextManager[Connection]:
        return self.write_internal()

    def dispose(self) -> None:
        self.engine.dispose()
        self._internal.dispose()
        if self._pings is not None:
            self._pings.close()

    def checked_out(self) -> int:
        return int(self.engine.pool.checkedout() + self._internal.pool.checkedout())  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def write_internal(self) -> Iterator[Connection]:
        # WAL with synchronous=NORMAL already skips per-commit fsync. The engine's own
        # writers (claims, records, workflow steps) queue on the process lock; the
        # app's writes (enqueues) take the retry path instead, where a waiting thread
        # sleeps rather than queueing behind the GIL on a lock hand-over (measured:
        # 1,150 vs 1,710 in-process runs/s; concurrent workflows keep the lock's gain).
        if not self._write_lock.acquire(blocking=not _ON_LOOP.get()):
            raise WouldBlock
        try:
            with self._transaction(self._internal) as conn:
                yield conn
        finally:
            self._write_lock.release()

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store function right here on the event loop if it need not wait.

        A short SQLite transaction is CPU work under the GIL wherever it runs, so a
        worker thread adds only two thread hand-overs (measured: a third of a
        workflow step's cost). On the loop, a write that finds the database locked
        raises WouldBlock before it has done anything; the call tries again after a
        short async sleep (other tasks run meanwhile) and, if the database stays
        locked, moves to a thread, where it waits without stalling the loop. `fn`
        must open at most one write transaction.
        """
        pause, waited = 0.0, 0.0
        while waited < _LOOP_PATIENCE_S:
            token = _ON_LOOP.set(True)
            try:
                return fn(*args, **kwargs)
            except WouldBlock:
                pass
            finally:
                _ON_LOOP.reset(token)
            # Let the holder finish (it is often another task's call, on a thread).
            await anyio.sleep(pause)
            waited += pause
            pause = min(max(pause * 2, 0.0001), 0.002)
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    def create_extras(self, conn: Connection) -> None:
        pass

    def lock_for_claim(self, stmt: Select[Any]) -> Select[Any]:
        return stmt

    def lock_rows(self, stmt: Select[Any]) -> Select[Any]:
        return stmt

    def lock_schema(self, conn: Connection) -> None:
        pass  # BEGIN IMMEDIATE already excludes every other writer

    def lock_key(self, conn: Connection, key: str) -> None:
        pass  # likewise

    def notify(self, conn: Connection, kind: str, payload: str = "") -> None:
        if self._pings is not None:  # sent once the transaction commits (see write)
            conn.info.setdefault(_PINGS, []).append((kind, payload))

    def announce(self, kind: str, payload: str = "") -> None:
        if self._pings is not None:
            self._pings.send(kind, payload)

    def start_listener(self, on_notify: Listener) -> Callable[[], None] | None:
        if self._pings is None:
            return None
        stop = self._pings.listen(on_notify)
        if stop is not None:
            on_notify(WAKE, "")  # listening now: catch up on anything sent before
        return stop


def _asynchronous_commit(dbapi_conn: Any, _record: Any) -> None:
    with dbapi_conn.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
    dbapi_conn.commit()


def _sqlite_connect(durability: Durability, dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cursor.execute(f"PRAGMA synchronous={durability.upper()}")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("tiers_begin", "IMMEDIATE")
    raw = conn.connection.dbapi_connection
    assert raw is not None
    _begin_with_retry(raw, f"BEGIN {mode}", timeout=-1.0 if _ON_LOOP.get() else 30.0)


def _begin_with_retry(raw: Any, begin: str, timeout: float = 30.0) -> None:
    """BEGIN, retrying a locked database every ~0.1-2 ms.

    SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries, so a writer
    waiting on a lock held for 100 us sleeps far past its release; under contention
    between processes that halves throughput. We retry on a finer schedule instead,
    with busy_timeout off for this one statement. A negative timeout means one try:
    a locked database raises WouldBlock.
    """
    raw.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + timeout
        pause = 0.0001
        while True:
            try:
                raw.execute(begin)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                if timeout < 0:
                    raise WouldBlock from None
                if time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 1.5, 0.002)
    finally:
        raw.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")


class PostgresDialect:
    """PostgreSQL through psycopg 3: SKIP LOCKED claims and LISTEN/NOTIFY wake-ups."""

    name = "postgresql"
    can_notify = True
    # LISTEN/NOTIFY pushes wake-ups; the poll is a safety net.
    default_poll_interval = timedelta(seconds=1)
    update_returning = True
    batch_rowcount = True
    server_claim = True

    def __init__(
        self, url: URL, namespace: str | None = None, durability: Durability = "normal"
    ) -> None:
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        if url.drivername != "postgresql+psycopg":
            raise InvalidDatabaseURL(
                f"use the psycopg (3) driver: postgresql+psycopg://..., not {url.drivername!r}"
            )
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise InvalidDatabaseURL(
                "PostgreSQL needs psycopg: pip install 'durable-tiers[postgres]'"
            ) from None
        self.url = url
        self.namespace = namespace
        suffix = f"_{namespace}" if namespace else ""
        self.wake_channel = f"tiers_wake{suffix}"
        self._channels = {WAKE: self.wake_channel, CANCEL: f"tiers_cancel{suffix}"}
        self.engine = create_engine(url, pool_size=10, max_overflow=30, pool_timeout=60)
        self._internal = create_engine(url, pool_size=4, max_overflow=16, pool_timeout=60)
        if namespace is not None:
            for engine in (self.engine, self._internal):
                event.listen(engine, "connect", partial(_search_path, namespace))
        if durability == "normal":
            event.listen(self._internal, "connect", _asynchronous_commit)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except DRIVER_ERRORS as exc:  # unreachable, locked, no tables: a TiersError
            raise_translated(exc, self.engine.url)

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except DRIVER_ERRORS as exc:  # unreachable, locked, no tables: a TiersError
            raise_translated(exc, self.engine.url)

    @contextlib.contextmanager
    def write_internal(self) -> Iterator[Connection]:
        with self._internal.begin() as conn:
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()
        self._internal.dispose()

    def checked_out(self) -> int:
        return int(self.engine.pool.checkedout() + self._internal.pool.checkedout())  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def write_internal_one(self) -> Iterator[Connection]:
        # One statement commits on its own: no BEGIN and COMMIT round trips.
        with self._internal.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    @contextlib.contextmanager
    def write_one(self) -> Iterator[Connection]:
        # One statement commits on its own: no BEGIN and COMMIT round trips.
        try:
            with self.engine.connect() as conn:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
        except DRIVER_ERRORS as exc:  # unreachable, locked, no tables: a TiersError
            raise_translated(exc, self.engine.url)

    def create_extras(self, conn: Connection) -> None:
        # New runs wake every listening worker: the server sends the NOTIFY itself,
        # at commit, whoever inserted them (including a user's own session).
        conn.execute(text(_WAKE_FUNCTION.replace("{channel}", self.wake_channel)))
        conn.exec_driver_sql(CLAIM_FUNCTION)
        conn.execute(text("DROP TRIGGER IF EXISTS tiers_runs_wake ON tiers_runs"))
        conn.execute(
            text(
                "CREATE TRIGGER tiers_runs_wake AFTER INSERT ON tiers_runs "
                "REFERENCING NEW TABLE AS new_runs "
                "FOR EACH STATEMENT EXECUTE FUNCTION tiers_notify_wake()"
            )
        )

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        # Every statement is a network round trip, during which a thread frees the GIL.
        # A few threads suffice to keep the server busy; dozens only fight over the
        # GIL while some of them hold row locks that the others wait for.
        return await anyio.to_thread.run_sync(
            lambda: fn(*args, **kwargs), limiter=_pg_call_limiter()
        )

    def lock_for_claim(self, stmt: Select[Any]) -> Select[Any]:
        return stmt.with_for_update(skip_locked=True)

    def lock_rows(self, stmt: Select[Any]) -> Select[Any]:
        return stmt.with_for_update()

    def lock_schema(self, conn: Connection) -> None:
        conn.execute(
            text("SELECT pg_advisory_xact_lock(7364115, hashtext(:ns))"),
            {"ns": self.namespace or ""},
        )
        if self.namespace is not None:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.namespace}"'))

    def lock_key(self, conn: Connection, key: str) -> None:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})

    def announce(self, kind: str, payload: str = "") -> None:
        pass  # runs committed by anyone are announced by the trigger on tiers_runs

    def notify(self, conn: Connection, kind: str, payload: str = "") -> None:
        conn.execute(
            text("SELECT pg_notify(:c, :p)"), {"c": self._channels[kind], "p": payload}
        )

    def start_listener(self, on_notify: Listener) -> Callable[[], None] | None:
        listener = _PgListener(self.url, self._channels, on_notify)
        listener.start()
        return listener.stop


def _search_path(namespace: str, dbapi_conn: Any, _record: Any) -> None:
    with dbapi_conn.cursor() as cursor:
        cursor.execute(f'SET search_path TO "{namespace}"')
    dbapi_conn.commit()


_WAKE_FUNCTION = """
CREATE OR REPLACE FUNCTION tiers_notify_wake() RETURNS trigger AS $$
BEGIN
    -- Only claimable rows: a run inserted already running (a workflow's inline step)
    -- would wake every worker for nothing.
    IF EXISTS (SELECT 1 FROM new_runs WHERE state IN ('pending', 'finishing')) THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""


class _PgListener:
    """A thread holding one LISTEN connection; it reconnects if the server drops it."""

    def __init__(self, url: URL, channels: dict[str, str], on_notify: Listener) -> None:
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._kinds = {channel: kind for kind, channel in channels.items()}
        self._on_notify = on_notify
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiers-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        while not self._stopped.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    for channel in self._kinds:
                        conn.execute(f'LISTEN "{channel}"')
                    self._on_notify(WAKE, "")  # catch up on anything missed
                    while not self._stopped.is_set():
                        for note in conn.notifies(timeout=0.5):
                            kind = self._kinds.get(note.channel)
                            if kind is not None:
                                self._on_notify(kind, note.payload)
            except Exception as exc:
                if self._stopped.is_set():
                    return
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                self._stopped.wait(1.0)
