"""Inserting runs that carry an idempotency key or a debounce: each may turn out to be
a run stored already, whose id is then the answer.

Plain runs never come here (`Store.insert_runs` inserts them in one statement, as
before); these cost a read back (idempotency) or a locked read (debounce) more.

- Idempotency: `INSERT ... ON CONFLICT DO NOTHING` against the unique index on
  (queue, idempotency_key), then the ids read back. Under concurrent callers in any
  number of processes exactly one insert wins: on PostgreSQL a conflicting insert
  waits for the transaction holding the same key to end, then skips the row (or
  inserts it, if that transaction rolled back); SQLite writers are serialized.
- Debounce: the pending, never-started run of (queue, fn, debounce key) is locked
  and updated in place, else a new one is inserted, under a lock on the key so two
  callers cannot both find none (PostgreSQL: an advisory lock for the transaction;
  SQLite: BEGIN IMMEDIATE already serializes writers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, false, select, update

from ._dialect import WAKE, Dialect
from ._errors import DatabaseBusy
from ._models import PENDING
from ._run_types import NewRun
from ._tables import INSERT_RUNS, chunks, in_state, runs

# The run a debounced call collapses into: pending and never started (a retry waiting
# for its backoff has started; so has a run handed back at shutdown).
_DEBOUNCE_TARGET = (
    select(runs.c.id, runs.c.owner, runs.c.created_ms)
    .where(
        runs.c.queue == bindparam("queue"),
        runs.c.debounce_key == bindparam("key"),
        runs.c.fn == bindparam("fn"),
        in_state(PENDING),
        runs.c.started_ms.is_(None),
        runs.c.cancel_requested == false(),
    )
    .order_by(runs.c.created_ms)
    .limit(1)
)


class KeyedInserts:
    """Inserts of runs with an idempotency key or a debounce, in a caller's transaction."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._insert_ignoring = dialect.insert_ignoring(runs)
        self._debounce_target = dialect.lock_rows(_DEBOUNCE_TARGET)

    def insert_in(
        self, conn: Connection, new: Sequence[NewRun], rows: list[dict[str, Any]], now: int
    ) -> list[str]:
        """Store `new` (whose column values are `rows`); the id each call gets, in order."""
        ids = [r.id for r in new]
        plain = [row for r, row in zip(new, rows, strict=True) if r.plain]
        if plain:
            conn.execute(INSERT_RUNS, plain)
        keyed = [i for i, r in enumerate(new) if r.idempotency_key is not None]
        if keyed:
            self._insert_keyed(conn, new, rows, keyed, ids)
        for i, r in enumerate(new):
            if r.debounce is not None:
                ids[i] = self.debounce_in(conn, r, rows[i], now).id
        return ids

    def _insert_keyed(
        self,
        conn: Connection,
        new: Sequence[NewRun],
        rows: list[dict[str, Any]],
        keyed: list[int],
        ids: list[str],
    ) -> None:
        first: dict[tuple[str, str], int] = {}  # a key given twice in one batch: once
        for i in keyed:
            first.setdefault((new[i].queue, str(new[i].idempotency_key)), i)
        stored: dict[tuple[str, str], str] = {}
        missing = list(first)
        for _ in range(3):  # again for a key whose run was deleted in between
            conn.execute(self._insert_ignoring, [rows[first[k]] for k in missing])
            stored.update(self._stored_ids(conn, missing))
            missing = [k for k in missing if k not in stored]
            if not missing:
                break
        else:
            raise DatabaseBusy(f"idempotency keys {missing} kept changing hands; try again")
        for i in keyed:
            ids[i] = stored[(new[i].queue, str(new[i].idempotency_key))]

    def _stored_ids(
        self, conn: Connection, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], str]:
        by_queue: dict[str, list[str]] = {}
        for queue, key in keys:
            by_queue.setdefault(queue, []).append(key)
        stored: dict[tuple[str, str], str] = {}
        for queue, names in by_queue.items():
            for chunk in chunks(names, 500):
                found = conn.execute(
                    select(runs.c.id, runs.c.idempotency_key).where(
                        runs.c.queue == queue, runs.c.idempotency_key.in_(chunk)
                    )
                )
                stored.update({(queue, k): i for i, k in found})
        return stored

    def debounce_in(
        self,
        conn: Connection,
        new: NewRun,
        row: dict[str, Any],
        now: int,
        *,
        replace_args: bool = True,
    ) -> Debounced:
        """Collapse `new` into the pending run of its debounce key (its args and
        context replaced unless `replace_args` is False, its due time moved), or insert
        it due one period from now. Which run it is, and whether it was stored before."""
        debounce = new.debounce
        assert debounce is not None
        key = str(new.debounce_key)
        params = {"queue": new.queue, "key": key, "fn": new.fn}
        self.dialect.lock_key(conn, "\x1f".join(("tiers.debounce", new.queue, new.fn, key)))
        found = conn.execute(self._debounce_target, params).first()
        if found is None:
            conn.execute(INSERT_RUNS, [{**row, "due_ms": debounce.due_ms(now, now)}])
            return Debounced(new.id, new.owner, False)
        values: dict[str, Any] = {"due_ms": debounce.due_ms(now, found.created_ms)}
        if replace_args:
            values.update(args=row["args"], context=row["context"])
        conn.execute(update(runs).where(runs.c.id == found.id).values(**values))
        # An update, which no insert trigger announces; the due time may have moved
        # earlier (a shorter period than the last call's).
        self.dialect.notify(conn, WAKE)
        return Debounced(found.id, found.owner, True)


@dataclass(frozen=True, slots=True)
class Debounced:
    """The run a debounced call got (and its owner): `collapsed` if stored before."""

    id: str
    owner: str | None
    collapsed: bool
