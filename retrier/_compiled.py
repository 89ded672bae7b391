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

A `CompiledQuery` does the same for a claim's statements, which take lists
(`IN :ids`, expanded per call by SQLAlchemy) and return rows: compiled once per size
of its lists, its rows' values processed by their columns' types as SQLAlchemy's
result would, returned as named tuples.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import CompoundSelect, Connection, Delete, Insert, Select, Update
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
        self._compiled: dict[tuple[str, ...], _Compiled] = {}

    def sql_and_params(self, row: dict[str, Any]) -> tuple[str, Sequence[Any] | dict[str, Any]]:
        """The statement's text and `row`'s values, as the driver takes them."""
        keys = tuple(row)
        found = self._compiled.get(keys)
        if found is None:
            found = self._compiled[keys] = self._compile(keys)
        sql, binds, take, processed = found
        if take is None:  # the statement has values of its own
            values = [row.get(name, default) for name, _, default in binds]
        else:
            values = list(take(row))
        for i, proc in processed:
            values[i] = proc(values[i])
        return sql, _for_driver(self._dialect, binds, values)

    def run_in(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """Execute the statement once per row of `rows` (which share their names), on
        `conn`'s driver connection inside its transaction; the number of rows changed
        (summed over the rows, as the driver counts: -1 where it does not say)."""
        if not rows:
            return 0
        sql, first = self.sql_and_params(rows[0])
        params = [first, *(self.sql_and_params(row)[1] for row in rows[1:])]
        return on_cursor(conn, sql, params, self._dialect)[0]

    def _compile(self, keys: tuple[str, ...]) -> _Compiled:
        compiled = self._stmt.compile(dialect=self._dialect, column_keys=list(keys))
        names = compiled.positiontup if self._dialect.positional else list(compiled.binds)
        assert names is not None
        binds: list[_Bind] = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(self._dialect).bind_processor(self._dialect)
            # A name the row lacks takes the statement's own value, as SQLAlchemy would.
            binds.append((name, processor, bind.effective_value))
        processed = [(i, proc) for i, (_, proc, _) in enumerate(binds) if proc is not None]
        return compiled.string, binds, _taker(names, keys), processed


# A statement compiled for one set of names: its text, its parameters, what takes
# their values from a row in order (None where the statement has values of its own)
# and the processors to apply, by index.
_Compiled = tuple[
    str, list[_Bind], Callable[[dict[str, Any]], Sequence[Any]] | None,
    list[tuple[int, Callable[[Any], Any]]],
]


def _taker(
    names: Sequence[str], keys: tuple[str, ...]
) -> Callable[[dict[str, Any]], Sequence[Any]] | None:
    """A function giving the values of `names` from a row with `keys`, as a sequence;
    None if some name is not among the keys."""
    if not set(names) <= set(keys):
        return None
    if len(names) == 1:
        name = names[0]
        return lambda row: (row[name],)
    return itemgetter(*names)


# A parameter as the driver takes it: its name in the expanded statement, the name
# (and index, for a list's item) of the value it takes, the statement's own value
# where the caller gives none, and its bind processor.
_Param = tuple[str, str, int | None, Any, _Processor]


class CompiledQuery:
    """`stmt` compiled for one SQLAlchemy dialect once per size of its expanding
    (`IN :list`) parameters, and run on a connection's driver cursor (inside its
    transaction). The rows of a SELECT (or of an UPDATE's or DELETE's RETURNING) come
    back as named tuples of its columns, their values processed as SQLAlchemy's
    result processes them (the driver's type code is not consulted: for dialects
    whose processors do not depend on it, such as SQLite's, or for columns with no
    processor, such as integers and strings on psycopg)."""

    def __init__(
        self, stmt: Select[Any] | CompoundSelect[Any] | Update | Delete, dialect: SADialect
    ) -> None:
        self._dialect = dialect
        self._compiled = stmt.compile(dialect=dialect)
        self._lists = [name for name, bind in self._compiled.binds.items() if bind.expanding]
        self._expanded: dict[tuple[int, ...], tuple[str, list[_Param]]] = {}
        self._row: Any = None
        columns = list(
            stmt.selected_columns
            if isinstance(stmt, Select | CompoundSelect)
            else stmt.exported_columns  # what it returns: none without RETURNING
        )
        if columns:
            self._row = namedtuple("Row", [str(c.key) for c in columns], rename=True)  # type: ignore[misc]
        processors = (c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
        # The columns whose values need processing (JSON, booleans on SQLite), by index.
        self._processed: list[tuple[int, Callable[[Any], Any]]] = [
            (i, proc) for i, proc in enumerate(processors) if proc is not None
        ]

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        """Execute with `params` (a value per parameter, a list for a list); the rows."""
        sql, values = self._sql_and_values(params)
        _, rows = on_cursor(conn, sql, [values], self._dialect, fetch=self._row is not None)
        make, processed = self._row._make, self._processed
        if not processed:
            return [make(r) for r in rows]
        made = []
        for r in rows:
            values = list(r)
            for i, proc in processed:
                values[i] = proc(values[i])
            made.append(make(values))
        return made

    def execute(self, conn: Connection, params: dict[str, Any]) -> int:
        """Execute with `params`; the rows changed."""
        sql, values = self._sql_and_values(params)
        return on_cursor(conn, sql, [values], self._dialect)[0]

    def _sql_and_values(self, params: dict[str, Any]) -> tuple[str, Any]:
        sizes = tuple(len(params[name]) for name in self._lists)
        found = self._expanded.get(sizes)
        if found is None:
            found = self._expanded[sizes] = self._expand(params)
        sql, binds = found
        values = []
        for _expanded, name, index, constant, proc in binds:
            if name not in params:
                value = constant
            elif index is None:
                value = params[name]
            else:
                value = params[name][index]
            values.append(value if proc is None else proc(value))
        return sql, _for_driver(self._dialect, binds, values)

    def _expand(self, params: dict[str, Any]) -> tuple[str, list[_Param]]:
        state = self._compiled.construct_expanded_state(params)
        origin: dict[str, tuple[str, int | None]] = {}
        for name, expanded in (state.parameter_expansion or {}).items():
            for position, each in enumerate(expanded):
                origin[each] = (name, position)
        names = state.positiontup if self._dialect.positional else list(state.parameters)
        assert names is not None
        binds: list[_Param] = []
        for each in names:
            name, index = origin.get(each, (each, None))
            constant = None if name in params else state.parameters[each]
            # A statement without lists has no expanded state's processors: its own.
            processor = state.processors.get(each) or self._processor(each)
            binds.append((each, name, index, constant, processor))
        return state.statement, binds

    def _processor(self, name: str) -> _Processor:
        bind = self._compiled.binds.get(name)
        if bind is None:
            return None
        return bind.type.dialect_impl(self._dialect).bind_processor(self._dialect)


def _for_driver(
    dialect: SADialect, binds: Sequence[tuple[Any, ...]], values: list[Any]
) -> Sequence[Any] | dict[str, Any]:
    """The values of `binds` (each named by its first item) as the driver takes them:
    in order (qmark, format) or by name."""
    if dialect.positional:
        return values
    return dict(zip((b[0] for b in binds), values, strict=True))


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
        rows = list(cursor.fetchall()) if fetch else []  # tuples, as both drivers make them
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
