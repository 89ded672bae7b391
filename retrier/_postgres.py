"""PostgreSQL through psycopg 3: SKIP LOCKED claims, a server-side claim function,
LISTEN/NOTIFY wake-ups, and namespaces as schemas."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus
from sqlalchemy import Connection, Engine, Insert, Table, create_engine, event, func, literal, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.engine import URL
from sqlalchemy.sql import ColumnElement, Select

from ._call_threads import CallThreads
from ._compiled import CompiledWrite, on_cursor, wrapped
from ._dberrors import DRIVER_ERRORS, raise_translated
from ._dialect import CANCEL, WAKE, Durability, Listener, P, T
from ._errors import InvalidDatabaseURL
from ._lone_connections import LoneConnections
from ._pg_claim import (
    CLAIM_FUNCTION,
    KEY_CAP_FUNCTION,
    QUEUE_ORDER_FUNCTION,
    TAKE_KEY_FUNCTION,
)
from ._pg_groups import GROUP_BUDGET_FUNCTION
from ._pg_wants import PgWants, wake_function

log = logging.getLogger("tiers.store")

# How many store calls from async code may run on threads at once (see `call`).
_PG_CALL_THREADS = 8
# The app's engine: its pool, and the connections for lone INSERTs beside it.
_APP_POOL_SIZE, _APP_POOL_OVERFLOW, _POOL_TIMEOUT_S = 10, 30, 60.0


# The engine's own statements find their rows through indexes: by id, or in a partial
# index of the states they look at. A statement the driver prepares is planned once
# for its session (a generic plan, PostgreSQL's choice after five executions), and a
# plan made while `tiers_runs` was small scans the whole table, in every later call of
# that session, until an ANALYZE replaces it: a worker started beside a fresh or quiet
# table recorded each batch of runs by reading all of them (0.6 ms at 5,000 stored
# runs, growing with them). Without sequential scans the plan is the index lookup at
# any size. JIT is off with them: it is priced on the cost that a forced-off scan
# takes (the planner adds 1e10), and compiled 100 ms of code per call for a scan of an
# empty table.
_INTERNAL_SETTINGS: tuple[str, ...] = ("SET enable_seqscan = off", "SET jit = off")


def _session_settings(settings: tuple[str, ...], dbapi_conn: Any, _record: Any) -> None:
    with dbapi_conn.cursor() as cursor:
        for setting in settings:
            cursor.execute(setting)
    dbapi_conn.commit()



class PostgresDialect:
    """PostgreSQL through psycopg 3: SKIP LOCKED claims and LISTEN/NOTIFY wake-ups."""

    name = "postgresql"
    can_notify = True
    # LISTEN/NOTIFY pushes wake-ups; the poll is a safety net.
    default_poll_interval = timedelta(seconds=1)
    update_returning = True
    batch_rowcount = True
    writes_in_cte = True
    server_claim = True
    # A backlog of short runs, drained with records of 16: the last run of each batch
    # used to miss its record and take one of its own, every time after (records of
    # 15 and 1); waiting this long for it halves the records (measured: a drain at
    # synchronous_commit on 1,570-1,780 -> 2,340-2,530 runs/s).
    straggler_wait_s = 0.0003

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
            import psycopg
        except ImportError:
            raise InvalidDatabaseURL(
                "PostgreSQL needs psycopg: pip install 'durable-tiers[postgres]'"
            ) from None
        self.url = url
        self.namespace = namespace
        suffix = f"_{namespace}" if namespace else ""
        self.wake_channel = f"tiers_wake{suffix}"
        self._channels = {WAKE: self.wake_channel, CANCEL: f"tiers_cancel{suffix}"}
        self.engine = create_engine(
            url, pool_size=_APP_POOL_SIZE, max_overflow=_APP_POOL_OVERFLOW,
            pool_timeout=_POOL_TIMEOUT_S,
        )
        # Every store call a thread may run at once, and the worker's claims, heartbeats
        # and timers beside them, keep a connection: one made per call (an overflow,
        # closed on return) costs a server process and a handshake.
        self._internal = create_engine(
            url, pool_size=_PG_CALL_THREADS + 4, max_overflow=16, pool_timeout=60
        )
        if namespace is not None:
            for engine in (self.engine, self._internal):
                event.listen(engine, "connect", partial(_search_path, namespace))
        settings = _INTERNAL_SETTINGS
        if durability == "normal":
            settings += ("SET synchronous_commit = off",)
        event.listen(self._internal, "connect", partial(_session_settings, settings))
        self._calls = CallThreads(_PG_CALL_THREADS)
        self._lone = LoneConnections(  # for an enqueue's lone INSERT, bounded as the pool
            self.engine, psycopg.Connection, _autocommit_on, _idle,
            limit=_APP_POOL_SIZE + _APP_POOL_OVERFLOW, timeout=_POOL_TIMEOUT_S,
        )

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
        self._calls.close()
        self._lone.close()
        self.engine.dispose()
        self._internal.dispose()

    def checked_out(self) -> int:
        return int(self.engine.pool.checkedout() + self._internal.pool.checkedout())  # type: ignore[attr-defined]

    def write_internal_one(self) -> contextlib.AbstractContextManager[Connection]:
        return _autocommit(self._internal)

    @contextlib.contextmanager
    def write_one(self) -> Iterator[Connection]:
        try:
            with _autocommit(self.engine) as conn:
                yield conn
        except DRIVER_ERRORS as exc:  # unreachable, locked, no tables: a TiersError
            raise_translated(exc, self.engine.url)

    def read_one(self) -> contextlib.AbstractContextManager[Connection]:
        return self.write_one()  # autocommit: the statement is its own snapshot

    def insert_alone(self, insert: CompiledWrite, row: dict[str, Any]) -> None:
        # One statement in autocommit mode: one round trip, on the driver directly.
        import psycopg

        sql, params = insert.sql_and_params(row)
        with self._lone.connection() as raw:  # closed, not kept, if this leaves it broken
            try:
                raw.execute(sql, params)
            except psycopg.Error as exc:
                lost = self.engine.dialect.is_disconnect(exc, raw, None)  # type: ignore[arg-type]
                if lost:  # the server restarted, or dropped us: so are the others
                    self._lone.close()
                    self.engine.dispose(close=False)
                error = wrapped(exc, sql, params, psycopg.Error, invalidated=lost)
                if isinstance(error, DRIVER_ERRORS):
                    raise_translated(error, self.engine.url)
                raise error from exc

    def create_extras(self, conn: Connection) -> None:
        # New runs wake every listening worker while one wants to hear of them (see
        # `_pg_wants`): the server sends the NOTIFY itself, at commit, whoever inserted
        # them (including a user's own session).
        conn.exec_driver_sql(KEY_CAP_FUNCTION)
        conn.exec_driver_sql(TAKE_KEY_FUNCTION)
        conn.exec_driver_sql(QUEUE_ORDER_FUNCTION)
        conn.exec_driver_sql(GROUP_BUDGET_FUNCTION)
        conn.exec_driver_sql(CLAIM_FUNCTION)
        conn.execute(text(wake_function(self.wake_channel)))
        conn.execute(text("DROP TRIGGER IF EXISTS tiers_runs_wake ON tiers_runs"))
        conn.execute(
            text(
                "CREATE TRIGGER tiers_runs_wake AFTER INSERT ON tiers_runs "
                "REFERENCING NEW TABLE AS new_runs "
                "FOR EACH STATEMENT EXECUTE FUNCTION tiers_notify_wake_v2()"
            )
        )

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        # Every statement is a network round trip, during which a thread frees the GIL.
        # A few threads suffice to keep the server busy; dozens only fight over the
        # GIL while some of them hold row locks that the others wait for.
        return await self._calls.call(lambda: fn(*args, **kwargs))

    def lock_for_claim(self, stmt: Select[Any]) -> Select[Any]:
        return stmt.with_for_update(skip_locked=True)

    def insert_ignoring(self, table: Table) -> Insert:
        return postgresql_insert(table).on_conflict_do_nothing()

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
        # On the driver's cursor: a worker sends one with most records.
        on_cursor(conn, _NOTIFY, [(self._channels[kind], payload)], conn.dialect)

    async def listen(
        self, on_notify: Listener, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = _PgListener(self.url, self._channels, on_notify)
        listener.start()
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(listener.stop)


    def announcement_wants(self, on_wanting: Callable[[], None]) -> PgWants:
        return PgWants(libpq_dsn(self.url), self.wake_channel, on_wanting)

    topics_notify = True

    def topic_channel(self, topic: str) -> str:
        suffix = f"_{self.namespace}" if self.namespace else ""
        channel = f"tiers_t_{topic}{suffix}"
        if len(channel) > 63:  # PostgreSQL refuses longer channel names
            raise ValueError(f"topic {topic!r} is too long for a channel name ({channel!r})")
        return channel

    def topic_notice(self, topic: str, payload: ColumnElement[Any]) -> ColumnElement[Any] | None:
        return func.pg_notify(literal(self.topic_channel(topic)), payload)

    def subscribe(self, topic: str, on_notify: Callable[[str], None]) -> _PgListener:
        listener = _PgListener(
            self.url, {topic: self.topic_channel(topic)}, lambda _kind, p: on_notify(p)
        )
        listener.start()
        return listener


@contextlib.contextmanager
def _autocommit(engine: Engine) -> Iterator[Connection]:
    """A connection on which one statement commits on its own: no BEGIN and COMMIT
    round trips. The driver's own switch, set back before the connection returns to
    the pool: SQLAlchemy's isolation_level option costs more Python than the call
    (a workflow step's server call measured a fifth of its CPU in it)."""
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.autocommit = True
        try:
            yield conn
        finally:
            if not raw.closed:
                raw.autocommit = False


def _search_path(namespace: str, dbapi_conn: Any, _record: Any) -> None:
    with dbapi_conn.cursor() as cursor:
        cursor.execute(f'SET search_path TO "{namespace}"')
    dbapi_conn.commit()


_NOTIFY = "SELECT pg_notify(%s, %s)"


def libpq_dsn(url: URL) -> str:
    """`url` as psycopg connects to it directly (a connection outside the engine's
    pool: LISTEN, the announcement lock), password included."""
    return str(url.set(drivername="postgresql").render_as_string(hide_password=False))


class _PgListener:
    """A thread holding one LISTEN connection; it reconnects if the server drops it."""

    def __init__(self, url: URL, channels: dict[str, str], on_notify: Listener) -> None:
        self._dsn = libpq_dsn(url)
        self._kinds = {channel: kind for kind, channel in channels.items()}
        self._on_notify = on_notify
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiers-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def close(self) -> None:
        """Stop listening (a Subscription): the thread ends within half a second."""
        self._stopped.set()

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


def _autocommit_on(raw: Any) -> None:
    raw.autocommit = True


def _idle(raw: Any) -> bool:
    """Whether a connection can take another lone statement: open, not in a
    transaction (an autocommit statement leaves none, unless the server went away)."""
    from psycopg.pq import TransactionStatus

    return bool(
        not raw.closed and not raw.broken and raw.info.transaction_status == TransactionStatus.IDLE
    )
