"""What the journal reads: a workflow with its whole journal (what a driver replays),
workflow rows and states, a workflow's entries for display, listings."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CompoundSelect, bindparam, cast, literal_column, null, select, union_all

from retrier.engine import CompiledQuery, Dialect, OwnedRun, Store

from ._errors import WorkflowNotFound
from ._limits import load_results
from ._models import WorkflowRow, steps_t, workflows_t


@dataclass(slots=True)
class Entry:
    """One journal entry, as a driver sees it."""

    name: str
    position: int
    kind: str
    state: str
    fn: str | None = None
    result: Any = None
    error: str | None = None
    wake_ms: int | None = None
    child_id: str | None = None
    result_size: int | None = None  # set: the result is in the side table, not loaded


@dataclass(slots=True)
class Loaded:
    """A workflow and its whole journal, read in one statement."""

    workflow: WorkflowRow
    entries: dict[str, Entry]


_ENTRY_COLUMNS = (
    steps_t.c.name,
    steps_t.c.position,
    steps_t.c.kind,
    steps_t.c.state,
    steps_t.c.fn,
    steps_t.c.result,
    steps_t.c.error,
    steps_t.c.wake_ms,
    steps_t.c.child_id,
    steps_t.c.result_size,
)


# The columns of a workflow's row, in the order `_with_journal` returns them.
_WORKFLOW_KEYS = tuple(workflows_t.c.keys())


def _with_journal() -> CompoundSelect[Any]:
    """A workflow's row and its journal in one statement (one round trip, one
    snapshot): the row first (`part` 0, then `_WORKFLOW_KEYS`), then one row per
    entry (`part` 1, the workflow's columns NULL, then `_ENTRY_COLUMNS`)."""
    nulls = [cast(null(), c.type) for c in (*workflows_t.c, *_ENTRY_COLUMNS)]
    width = len(_WORKFLOW_KEYS)
    return union_all(
        select(literal_column("0").label("part"), *workflows_t.c, *nulls[width:])
        .where(workflows_t.c.id == bindparam("wf")),
        select(literal_column("1"), *nulls[:width], *_ENTRY_COLUMNS)
        .where(steps_t.c.workflow_id == bindparam("wf")),
    )


class JournalReads:
    """The reads of `Journal` (its base): each in a read transaction of its own."""

    store: Store
    dialect: Dialect

    def compile_reads(self) -> None:
        """A driver's journal, read at every pass: on the driver (retrier's `_compiled`)."""
        sa_dialect = self.dialect.engine.dialect
        self._with_journal = CompiledQuery(_with_journal(), sa_dialect)

    def load(self, workflow_id: str) -> Loaded | None:
        with self.dialect.read_one() as conn:
            rows = self._with_journal.rows(conn, {"wf": workflow_id})
        row = next((r for r in rows if r[0] == 0), None)
        if row is None:
            return None
        entry = 1 + len(_WORKFLOW_KEYS)  # where an entry's columns begin
        entries = {r[entry]: Entry(*r[entry:]) for r in rows if r[0] == 1}
        columns = dict(zip(_WORKFLOW_KEYS, row[1:entry], strict=True))
        return Loaded(WorkflowRow.model_validate(columns), entries)

    def get(self, workflow_id: str) -> WorkflowRow:
        with self.dialect.read() as conn:
            row = (
                conn.execute(select(workflows_t).where(workflows_t.c.id == workflow_id))
                .mappings()
                .first()
            )
        if row is None:
            raise WorkflowNotFound(workflow_id)
        return WorkflowRow.model_validate(dict(row))

    def rows(self, workflow_ids: builtins.list[str]) -> dict[str, WorkflowRow]:
        """The rows of these workflows, by id (`WorkflowNotFound` if one is missing)."""
        found: dict[str, WorkflowRow] = {}
        with self.dialect.read() as conn:
            for start in range(0, len(workflow_ids), 500):
                chunk = workflow_ids[start : start + 500]
                for r in conn.execute(
                    select(workflows_t).where(workflows_t.c.id.in_(chunk))
                ).mappings():
                    found[r["id"]] = WorkflowRow.model_validate(dict(r))
        for workflow_id in workflow_ids:
            if workflow_id not in found:
                raise WorkflowNotFound(workflow_id)
        return found

    def states(self, workflow_ids: list[str]) -> dict[str, str]:
        with self.dialect.read() as conn:
            rows = conn.execute(
                select(workflows_t.c.id, workflows_t.c.state).where(
                    workflows_t.c.id.in_(workflow_ids)
                )
            ).all()
        return {r.id: r.state for r in rows}

    def steps(self, workflow_id: str) -> list[dict[str, Any]]:
        """Every journal entry of a workflow, in call order, as dicts of its columns
        (with results kept in the side table filled in)."""
        with self.dialect.read() as conn:
            rows = [
                dict(r)
                for r in conn.execute(
                    select(steps_t)
                    .where(steps_t.c.workflow_id == workflow_id)
                    .order_by(steps_t.c.position, steps_t.c.id)
                ).mappings()
            ]
            apart = [r["name"] for r in rows if r["result_size"] is not None]
            found = load_results(conn, workflow_id, apart)
        for r in rows:
            if r["name"] in found:
                r["result"] = found[r["name"]]
        return rows

    def load_result(self, workflow_id: str, name: str) -> Any:
        """A step result kept in the side table (see `Entry.result_size`)."""
        with self.dialect.read() as conn:
            return load_results(conn, workflow_id, [name]).get(name)

    def unfinished_runs(self, workflow_id: str) -> list[OwnedRun]:
        """The pending and running runs a workflow owns (its steps, its driver)."""
        with self.dialect.read() as conn:
            return self.store.unfinished_of(conn, workflow_id)

    def list(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        pool: str | None = None,
        limit: int = 100,
    ) -> list[WorkflowRow]:
        wanted = {"state": state, "name": name, "pool": pool}
        stmt = (
            select(workflows_t)
            .where(*(workflows_t.c[k] == v for k, v in wanted.items() if v is not None))
            .order_by(workflows_t.c.created_ms.desc())
            .limit(limit)
        )
        with self.dialect.read() as conn:
            return [WorkflowRow.model_validate(dict(r)) for r in conn.execute(stmt).mappings()]
