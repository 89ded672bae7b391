"""Retention: finished workflows (with their journals, log lines and large results)
and old events are deleted after the retrier's `retention`, in batches, by the
worker's daily retention job (registered with `Store.add_retention`).

A finished workflow's engine runs (its steps, its drivers, its on_complete) are
completed runs: the engine's own retention deletes them.
"""

from __future__ import annotations

from sqlalchemy import delete, select

from ._journal import Journal, delete_workflows
from ._models import FINISHED, events_t, workflows_t

BATCH = 500


def purge_workflows(journal: Journal, older_than_ms: int, batch: int = BATCH) -> int:
    """Delete the workflows that finished more than `older_than_ms` ago, with their
    journals, log lines and large results, `batch` per transaction; how many."""
    cutoff = journal.clock.now_ms() - older_than_ms
    total = 0
    while True:
        with journal.dialect.write_internal() as conn:
            ids = list(
                conn.execute(
                    select(workflows_t.c.id)
                    .where(workflows_t.c.finished_ms < cutoff, workflows_t.c.state.in_(FINISHED))
                    .limit(batch)
                ).scalars()
            )
            if not ids:
                return total
            delete_workflows(conn, ids)
        total += len(ids)


def purge_events(journal: Journal, older_than_ms: int, batch: int = BATCH) -> int:
    """Delete the events sent more than `older_than_ms` ago, `batch` per transaction;
    how many. (A wait started later no longer sees them.)"""
    cutoff = journal.clock.now_ms() - older_than_ms
    total = 0
    while True:
        with journal.dialect.write_internal() as conn:
            ids = list(
                conn.execute(
                    select(events_t.c.id).where(events_t.c.created_ms < cutoff).limit(batch)
                ).scalars()
            )
            if not ids:
                return total
            conn.execute(delete(events_t).where(events_t.c.id.in_(ids)))
        total += len(ids)
