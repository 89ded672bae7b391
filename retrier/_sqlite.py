"""SQLite: one file in WAL mode, shared by the processes of one machine."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus
from sqlalchemy import Connection, Engine, Insert, Table, create_engine, event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.sql import ColumnElement, Select

from ._compiled import CompiledWrite, on_cursor, wrapped
from ._dberrors import DRIVER_ERRORS, raise_translated
from ._dialect import (
    ON_LOOP,
    WAKE,
    AlwaysWanting,
    Durability,
    Listener,
    NoSubscription,
    P,
    Subscription,
    T,
    WouldBlock,
    stamped,
)
from ._errors import InvalidDatabaseURL
from ._group_commit import JOINED, Ended, GroupCommit, failed_all, run_joined, savepoint
from ._lone_connections import LoneConnections
from ._pings import Pings

# How long a write waits for another's lock before it fails with DatabaseBusy, unless
# the URL says (`sqlite:///app.db?timeout=5`, in seconds, as sqlite3.connect takes it).
_DEFAULT_TIMEOUT_S = 30.0
# The app's engine: its pool, and the connections for lone INSERTs beside it.
_APP_POOL_SIZE, _APP_POOL_OVERFLOW, _POOL_TIMEOUT_S = 8, 32, 60.0
# Pings a SQLite transaction asked for (key in a connection's info), sent at commit.
_PINGS = "tiers_pings"


class SQLiteDialect:
    """One file in WAL mode. Writers take the lock up front with BEGIN IMMEDIATE, so a
    claim's SELECT and UPDATE can never interleave with another process's claim."""

    name = "sqlite"
    wake_channel = ""
    update_returning = True
    batch_rowcount = True
    writes_in_cte = False
    server_claim = False  # a claim here is in-process already: no round trips to save
    straggler_wait_s = 0.0  # a record is a local write: not worth a wait

    def __init__(self, url: URL, durability: Durability = "normal") -> None:
        if url.drivername != "sqlite" and url.drivername != "sqlite+pysqlite":
            raise InvalidDatabaseURL(f"use the default sqlite driver, not {url.drivername!r}")
        if not url.database or url.database == ":memory:":
            raise InvalidDatabaseURL(
                "an in-memory SQLite database cannot be shared with workers; "
                "give a file: sqlite:///tiers.db"
            )
        timeout = _timeout_of(url)
        self.engine = create_engine(
            url, pool_size=_APP_POOL_SIZE, max_overflow=_APP_POOL_OVERFLOW,
            pool_timeout=_POOL_TIMEOUT_S,
        )
        self.update_returning = bool(self.engine.dialect.update_returning)  # SQLite >= 3.35
        # The engine's own writes (claims, records, workflow steps) have connections
        # of their own, reused most-recent-first: one that wrote last keeps its page
        # cache, which any other connection's write would have invalidated.
        self._internal = create_engine(
            url, pool_size=4, max_overflow=16, pool_timeout=60, pool_use_lifo=True
        )
        # An app's connections keep SQLite's busy handler for the statements it runs;
        # the engine's own only ever wait at BEGIN IMMEDIATE (a transaction holding
        # the write lock waits for nothing in WAL mode), so theirs is off for good.
        for engine, busy_handler in ((self.engine, True), (self._internal, False)):
            busy_ms = round(timeout * 1000) if busy_handler else 0
            event.listen(engine, "connect", partial(_sqlite_connect, durability, busy_ms))
            event.listen(engine, "begin", _begin_waiting_up_to(timeout, busy_handler))
        self._timeout = timeout
        self._lone = LoneConnections(  # for an enqueue's lone INSERT, bounded as the pool
            self.engine, sqlite3.Connection, _busy_handler_off, _not_in_transaction,
            limit=_APP_POOL_SIZE + _APP_POOL_OVERFLOW, timeout=_POOL_TIMEOUT_S,
        )
        # SQLite admits one writer at a time. This process's writers take turns on a
        # lock of our own first (see WriterTurns and write_internal).
        self._write_lock = WriterTurns(timeout)
        # Other processes' workers learn of new runs from pings (see _pings), and
        # else by polling: a cheap read.
        self._pings = Pings(url.database) if Pings.available() else None
        self.can_notify = self._pings is not None
        self.default_poll_interval = timedelta(milliseconds=100 if self.can_notify else 25)
        self._groups = GroupCommit(self._run_group, self._run_alone)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        if (joined := JOINED.get()) is not None:
            yield joined
            return
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(tiers_begin="DEFERRED")
                with conn.begin():
                    yield conn
        except DRIVER_ERRORS as exc:  # unreachable, locked, no tables: a TiersError
            raise_translated(exc, self.engine.url)

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        if (joined := JOINED.get()) is not None:
            with savepoint(joined):
                yield joined
            return
        try:
            with self._turn(), self._transaction(self.engine) as conn:
                yield conn
        except DRIVER_ERRORS as exc:  # unreachable, locked, no tables: a TiersError
            raise_translated(exc, self.engine.url)

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's write lock: waited for on a thread, tried on the loop
        (WouldBlock if another writer holds it)."""
        if not self._write_lock.acquire(blocking=not ON_LOOP.get()):
            raise WouldBlock
        try:
            yield
        finally:
            self._write_lock.release()

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
                self._pings.send(kind, stamped(kind, payload), fresh=kind != WAKE)

    def write_one(self) -> contextlib.AbstractContextManager[Connection]:
        return self.write()

    def read_one(self) -> contextlib.AbstractContextManager[Connection]:
        return self.read()  # a local read: no round trips to save

    def insert_alone(self, insert: CompiledWrite, row: dict[str, Any]) -> None:
        # In autocommit mode (pysqlite's isolation_level=None) a lone INSERT is its own
        # transaction: it takes the write lock, writes and commits, or does nothing.
        sql, params = insert.sql_and_params(row)
        if (joined := JOINED.get()) is not None:  # a group's call (`run_async`)
            with savepoint(joined):
                on_cursor(joined, sql, [params], self.engine.dialect)
            return
        try:
            with self._lone.connection() as raw:
                # on the loop (a lone group call): one try, WouldBlock if locked
                _retrying(
                    lambda: raw.execute(sql, params), -1.0 if ON_LOOP.get() else self._timeout
                )
        except sqlite3.Error as exc:
            error = wrapped(exc, sql, params, sqlite3.Error)
            if isinstance(exc, sqlite3.OperationalError):
                raise_translated(error, self.engine.url)
            raise error from exc

    def write_internal_one(self) -> contextlib.AbstractContextManager[Connection]:
        return self.write_internal()

    def dispose(self) -> None:
        self._lone.close()
        self.engine.dispose()
        self._internal.dispose()
        if self._pings is not None:
            self._pings.close()

    def checked_out(self) -> int:
        return int(self.engine.pool.checkedout() + self._internal.pool.checkedout())  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def write_internal(self) -> Iterator[Connection]:
        # WAL with synchronous=NORMAL already skips per-commit fsync. This process's
        # writers (claims, records, workflow steps, an app's writes) queue on the
        # process lock (see WriterTurns); a lone enqueue (`insert_alone`) takes the
        # retry path instead, where a waiting thread sleeps rather than queueing
        # behind the GIL on a lock hand-over (measured: 1,150 vs 1,710 in-process
        # runs/s).
        if (joined := JOINED.get()) is not None:
            with savepoint(joined):
                yield joined
            return
        with self._turn(), self._transaction(self._internal) as conn:
            yield conn

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store function in this loop's next group commit (`_group_commit`).

        A short SQLite transaction is CPU work under the GIL wherever it runs, so a
        group runs right here on the event loop when the database is free: a worker
        thread would add only two thread hand-overs (measured: a third of a workflow
        step's cost). `fn` writes in its group's transaction, in a savepoint; run
        alone, it must open at most one write transaction (a locked database raises
        WouldBlock before it has done anything, and the call joins the next group).
        """
        value: T = await self._groups.call(partial(fn, *args, **kwargs))
        return value

    def _run_alone(self, call: Callable[[], Any]) -> Ended | None:
        """A lone call on the loop, in the transaction it opens: None if that found
        the database locked (WouldBlock, raised before it has done anything)."""
        token = ON_LOOP.set(True)
        try:
            return Ended(value=call())
        except WouldBlock:
            return None
        except Exception as exc:
            return Ended(error=exc)
        finally:
            ON_LOOP.reset(token)

    def _run_group(self, calls: list[Callable[[], Any]], *, wait: bool) -> list[Ended] | None:
        """One write transaction for `calls` (see `GroupCommit`); None if the database
        is locked and `wait` is False (on the loop, where waiting would stall it)."""
        token = ON_LOOP.set(not wait)
        ended: list[Ended] | None = None
        try:
            with self.write_internal() as conn:
                ended = run_joined(conn, calls)
        except WouldBlock:
            if ended is None:
                return None  # this process's lock, or BEGIN, found another writer
            raise
        except Exception as exc:  # the commit failed, or a savepoint broke the rest
            return failed_all(ended, len(calls), exc)
        finally:
            ON_LOOP.reset(token)
        return ended

    def create_extras(self, conn: Connection) -> None:
        pass

    def lock_for_claim(self, stmt: Select[Any]) -> Select[Any]:
        return stmt

    def insert_ignoring(self, table: Table) -> Insert:
        return sqlite_insert(table).on_conflict_do_nothing()

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
            self._pings.send(kind, stamped(kind, payload), fresh=kind != WAKE)

    def announcement_wants(self, on_wanting: Callable[[], None]) -> AlwaysWanting:
        return AlwaysWanting()

    topics_notify = False  # watchers poll: a read is cheap on a local file

    def topic_notice(self, topic: str, payload: ColumnElement[Any]) -> ColumnElement[Any] | None:
        return None

    def topic_channel(self, topic: str) -> str | None:
        return None

    def subscribe(self, topic: str, on_notify: Callable[[str], None]) -> Subscription:
        return NoSubscription()

    async def listen(
        self, on_notify: Listener, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        receiver = self._pings.bind() if self._pings is not None else None
        task_status.started()
        if receiver is None:
            await anyio.sleep_forever()
            return
        try:
            on_notify(WAKE, "")  # listening now: catch up on anything sent before
            while True:
                await anyio.wait_readable(receiver.socket)
                for kind, payload in receiver.drain():
                    on_notify(kind, payload)
        finally:
            receiver.close()



def _timeout_of(url: URL) -> float:
    """The URL's `timeout` (seconds a write waits for a lock), or the default."""
    given = url.query.get("timeout")
    if given is None:
        return _DEFAULT_TIMEOUT_S
    try:
        timeout = float(given if isinstance(given, str) else given[-1])
    except ValueError:
        timeout = math.nan
    if not 0 <= timeout <= 3600:
        raise InvalidDatabaseURL(f"timeout must be seconds from 0 to 3600, got {given!r}")
    return timeout


class WriterTurns:
    """The lock this process's writers take before SQLite's own.

    A thread that waits for it goes before the event loop's next try (the loop only
    ever tries, never waits), so an app's write is not starved by a worker whose loop
    writes back to back (measured: 300 workflows started one by one beside their
    in-process worker, 138-145 -> 221-231 starts/s). A thread waits at most `timeout`
    seconds, then raises SQLite's own "database is locked".
    """

    def __init__(self, timeout: float) -> None:
        self._lock = threading.RLock()
        self._timeout = timeout
        self._count = threading.Lock()
        self._waiting = 0

    def acquire(self, *, blocking: bool) -> bool:
        if not blocking:
            return self._waiting == 0 and self._lock.acquire(blocking=False)
        with self._count:
            self._waiting += 1
        try:
            if not self._lock.acquire(timeout=self._timeout):
                raise sqlite3.OperationalError("database is locked")
            return True
        finally:
            with self._count:
                self._waiting -= 1

    def release(self) -> None:
        self._lock.release()


def _sqlite_connect(
    durability: Durability, busy_ms: int, dbapi_conn: Any, _record: Any
) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.execute(f"PRAGMA synchronous={durability.upper()}")
    cursor.close()


def _busy_handler_off(raw: sqlite3.Connection) -> None:
    raw.execute("PRAGMA busy_timeout=0")


def _not_in_transaction(raw: sqlite3.Connection) -> bool:
    return not raw.in_transaction


def _begin_waiting_up_to(timeout: float, busy_handler: bool) -> Callable[[Connection], None]:
    """The engine's "begin" listener (a plain function: SQLAlchemy inspects what it
    is given, and a partial costs more per call). `busy_handler`: the connections have
    SQLite's on, to be switched off while BEGIN waits on our schedule."""

    def begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("tiers_begin", "IMMEDIATE")
        raw = conn.connection.dbapi_connection
        assert raw is not None
        if mode == "DEFERRED":
            raw.execute("BEGIN DEFERRED")  # takes no lock: nothing to wait for
            return
        statement = partial(raw.execute, f"BEGIN {mode}")
        wait = -1.0 if ON_LOOP.get() else timeout
        if busy_handler:
            _with_retry(raw, statement, wait, timeout)
        else:
            _retrying(statement, wait)

    return begin


def _with_retry(
    raw: Any, statement: Callable[[], object], timeout: float, busy_timeout: float
) -> None:
    """`_retrying`, on a connection whose busy handler is on: off for this one
    statement, then back to `busy_timeout` (in seconds)."""
    _busy_handler_off(raw)
    try:
        _retrying(statement, timeout)
    finally:
        raw.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")


def _retrying(statement: Callable[[], object], timeout: float) -> None:
    """Run `statement` (one that takes the write lock or does nothing, on a connection
    whose busy handler is off), retrying a locked database every ~0.1-2 ms.

    SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries, so a writer
    waiting on a lock held for 100 us sleeps far past its release; under contention
    between processes that halves throughput. We retry on a finer schedule instead.
    A negative timeout means one try: a locked database raises WouldBlock.
    """
    deadline = time.monotonic() + timeout
    pause = 0.0001
    while True:
        try:
            statement()
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
