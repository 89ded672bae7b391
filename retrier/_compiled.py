"""Writes of the hot paths, compiled once and run on the driver's own connection.

Through SQLAlchemy's Connection, a statement spends more time in its execution
context, events and per-call parameter processing than in the database: a single
INSERT on PostgreSQL measured 84 us of CPU through `Connection.execute` against 26 us
on the driver's cursor; py-spy of a SQLite producer found the Connection and its
transaction 35-40% of `run()`. A `CompiledWrite` is compiled once per set of column
names, its values go through the bind processors SQLAlchemy would apply, and it runs
either as a statement that commits alone (`Dialect.insert_alone`: `retrier.run()`'s
single run) or on the cursor of a SQLAlchemy connection, inside its transaction
(`run_in`: the attempts, settles and journal writes of every recorded outcome and
workflow step). Driver errors come back wrapped as SQLAlchemy's
(`DBAPIError.instance`), a lost connection invalidated as SQLAlchemy would, so
callers and `is_transient` see what they see from any other write.

Only writes whose results are a row count take this path: statements that return
rows go through SQLAlchemy, which processes their values by type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Delete, Insert, Update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect as SADialect

_Processor = Callable[[Any], Any] | None
_Bind = tuple[str, _Processor, Any]  # a parameter's name, bind processor and default


class CompiledWrite:
    """`stmt` (an INSERT, UPDATE or DELETE without RETURNING) compiled for one
    SQLAlchemy dialect, per set of parameter names."""

    def __init__(self, stmt: Insert | Update | Delete, dialect: SADialect) -> None:
        self._stmt = stmt
        self._dialect = dialect
        self._compiled: dict[tuple[str, ...], tuple[str, list[_Bind]]] = {}

    def sql_and_params(self, row: dict[str, Any]) -> tuple[str, Sequence[Any] | dict[str, Any]]:
        """The statement's text and `row`'s values, as the driver takes them."""
        keys = tuple(row)
        found = self._compiled.get(keys)
        if found is None:
            found = self._compiled[keys] = self._compile(keys)
        sql, binds = found
        values = [
            (name, value if proc is None else proc(value))
            for name, proc, default in binds
            for value in (row.get(name, default),)
        ]
        if self._dialect.positional:
            return sql, [value for _, value in values]
        return sql, dict(values)

    def run_in(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """Execute the statement once per row of `rows` (which share their names), on
        `conn`'s driver connection inside its transaction; the number of rows changed
        (summed over the rows, as the driver counts: -1 where it does not say)."""
        if not rows:
            return 0
        sql, first = self.sql_and_params(rows[0])
        params = [first, *(self.sql_and_params(row)[1] for row in rows[1:])]
        return on_cursor(conn, sql, params, self._dialect)[0]

    def _compile(self, keys: tuple[str, ...]) -> tuple[str, list[_Bind]]:
        compiled = self._stmt.compile(dialect=self._dialect, column_keys=list(keys))
        names = compiled.positiontup if self._dialect.positional else list(compiled.binds)
        assert names is not None
        binds: list[_Bind] = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(self._dialect).bind_processor(self._dialect)
            # A name the row lacks takes the statement's own value, as SQLAlchemy would.
            binds.append((name, processor, bind.effective_value))
        return compiled.string, binds


def on_cursor(
    conn: Connection,
    sql: str,
    params: Sequence[Sequence[Any] | dict[str, Any]],
    dialect: SADialect,
    *,
    fetch: bool = False,
) -> tuple[int, list[tuple[Any, ...]]]:
    """Execute `sql` once per parameter set of `params` on `conn`'s driver connection
    (inside its transaction, or alone on a connection in autocommit mode); the rows
    changed (as the driver counts: -1 where it does not say) and, with `fetch`, the
    rows a single execution returned (values as the driver decodes them). Errors come
    back as SQLAlchemy's, a lost connection invalidated."""
    pooled = conn.connection
    raw = pooled.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        if len(params) == 1:
            cursor.execute(sql, params[0])
        else:
            cursor.executemany(sql, params)  # type: ignore[arg-type]
        rows = [tuple(r) for r in cursor.fetchall()] if fetch else []
        return int(cursor.rowcount), rows
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, raw, cursor)
        if lost:
            conn.invalidate(exc)
        raise wrapped(exc, sql, params, dialect.loaded_dbapi.Error, invalidated=lost) from exc
    finally:
        try:
            cursor.close()
        except dialect.loaded_dbapi.Error:
            pass  # the connection is gone; the error above says so


def wrapped(exc: Exception, sql: str, params: Any, base: type[Exception],
            *, invalidated: bool = False) -> sa_exc.DBAPIError:
    """A driver's exception as SQLAlchemy raises it from `Connection.execute`."""
    return sa_exc.DBAPIError.instance(  # type: ignore[return-value]
        sql, params, exc, base, connection_invalidated=invalidated
    )
