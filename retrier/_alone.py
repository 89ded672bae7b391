"""One INSERT, compiled once and run on the driver's own connection, for the hot path
of `retrier.run()`: a single run written in a transaction of its own.

Through SQLAlchemy's Connection, such an insert spent more time in its transaction
objects, events and per-call parameter processing than in the database (py-spy of a
SQLite producer: the Connection and its transaction 35-40% of `run()`, the commit
itself 28%). Here the statement is compiled once per set of columns, its values go
through the same bind processors SQLAlchemy would apply, and the dialect runs it as a
statement that commits alone (`Dialect.insert_alone`). Driver errors come back
wrapped as SQLAlchemy's (`DBAPIError.instance`), so callers and `is_transient` see
what they see from any other write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Insert
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect as SADialect

_Processor = Callable[[Any], Any] | None


class CompiledInsert:
    """`stmt` compiled for one SQLAlchemy dialect, per set of column names."""

    def __init__(self, stmt: Insert, dialect: SADialect) -> None:
        self._stmt = stmt
        self._dialect = dialect
        self._compiled: dict[tuple[str, ...], tuple[str, list[tuple[str, _Processor]]]] = {}

    def sql_and_params(self, row: dict[str, Any]) -> tuple[str, Sequence[Any] | dict[str, Any]]:
        """The statement's text and `row`'s values, as the driver takes them."""
        keys = tuple(row)
        found = self._compiled.get(keys)
        if found is None:
            found = self._compiled[keys] = self._compile(keys)
        sql, binds = found
        values = [(name, row[name] if proc is None else proc(row[name])) for name, proc in binds]
        if self._dialect.positional:
            return sql, [value for _, value in values]
        return sql, dict(values)

    def _compile(self, keys: tuple[str, ...]) -> tuple[str, list[tuple[str, _Processor]]]:
        compiled = self._stmt.compile(dialect=self._dialect, column_keys=list(keys))
        names = compiled.positiontup if self._dialect.positional else list(compiled.binds)
        assert names is not None
        binds: list[tuple[str, _Processor]] = []
        for name in names:
            type_ = compiled.binds[name].type
            binds.append((name, type_.dialect_impl(self._dialect).bind_processor(self._dialect)))
        return compiled.string, binds


def wrapped(exc: Exception, sql: str, params: Any, base: type[Exception],
            *, invalidated: bool = False) -> sa_exc.DBAPIError:
    """A driver's exception as SQLAlchemy raises it from `Connection.execute`."""
    return sa_exc.DBAPIError.instance(  # type: ignore[return-value]
        sql, params, exc, base, connection_invalidated=invalidated
    )
