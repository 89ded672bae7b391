"""A new workflow's row and its first driver run in one statement, alone.

A start outside any session is a transaction of two inserts: on PostgreSQL four round
trips (BEGIN, the workflow, its driver run, COMMIT). Where writes nest in a WITH
(`Dialect.writes_in_cte`), the workflow's insert goes in a data-modifying CTE of the
run's, and the statement commits alone (`Dialect.insert_alone`): one round trip,
still both rows or neither.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Insert, Table, bindparam, insert

from retrier.engine import CompiledWrite, RunRow, Store

from ._models import workflows_t

_RUNS: Table = RunRow.__table__  # type: ignore[attr-defined]


class StartAlone:
    """Inserts a workflow row with its driver run's row, compiled once per set of
    columns the two rows give."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._writes: dict[tuple[tuple[str, ...], tuple[str, ...]], CompiledWrite] = {}

    def insert(self, workflow: dict[str, Any], run: dict[str, Any]) -> None:
        keys = (tuple(workflow), tuple(run))
        write = self._writes.get(keys)
        if write is None:
            statement = _both(*keys)
            write = self._writes[keys] = CompiledWrite(statement, self._store.engine.dialect)
        params = {f"w_{k}": v for k, v in workflow.items()}
        params.update((f"r_{k}", v) for k, v in run.items())
        self._store.dialect.insert_alone(write, params)


def _both(workflow_keys: tuple[str, ...], run_keys: tuple[str, ...]) -> Insert:
    new_workflow = insert(workflows_t).values(_values(workflows_t, workflow_keys, "w_"))
    return insert(_RUNS).values(_values(_RUNS, run_keys, "r_")).add_cte(
        new_workflow.cte("new_workflow")
    )


def _values(table: Table, keys: tuple[str, ...], prefix: str) -> dict[str, Any]:
    """A parameter per column the row gives, and the column's default for each other
    one that has a default (a nested INSERT cannot fetch it from Python)."""
    values: dict[str, Any] = {}
    for c in table.c:
        if c.key in keys:
            values[c.key] = bindparam(prefix + c.key, type_=c.type)
        elif c.default is not None:
            default = c.default.arg  # type: ignore[attr-defined]
            values[c.key] = bindparam(prefix + c.key, default, type_=c.type)
    return values
