"""The workflow tier's size limits, in one table, and where large step results go.

Every limit counts bytes of compact UTF-8 JSON and is checked before anything is
written, with `retrier.ValueTooLarge` (an `InvalidArguments`) naming the value and
the limit (see docs/workflow.md, "Size limits").
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, delete, insert, select

from retrier.engine import check_size

from ._models import results_t

KiB = 1024
MiB = 1024 * KiB

MAX_ARGS = 1 * MiB
"""A workflow's arguments, and a step's (stored with its run)."""
MAX_EVENT = 1 * MiB
"""The data of an event (`send_event`)."""
MAX_PROGRESS = 64 * KiB
"""A value given to `ctx.set_progress` (written often, read by every watcher)."""
MAX_LOG = 8 * KiB
"""A `ctx.log` message, in UTF-8 bytes; longer ones are cut, with a note."""
MAX_RESULT = 4 * MiB
"""A step's result, a child workflow's, and a workflow's own."""
INLINE_RESULT = 64 * KiB
"""Step results larger than this are kept apart from the journal (in
tiers_workflow_results) and read only when a replay reaches their step."""


def check_args(args: Any, what: str) -> None:
    check_size(args, what, MAX_ARGS)


def check_event(data: Any, event: str) -> None:
    check_size(data, f"the data of event {event!r}", MAX_EVENT)


def check_progress(value: Any) -> None:
    check_size(value, "the progress", MAX_PROGRESS)


def cut_log(message: str) -> str:
    raw = message.encode()
    if len(raw) <= MAX_LOG:
        return message
    kept = raw[: MAX_LOG - 32].decode(errors="ignore")
    return f"{kept}… [cut: {len(raw)} bytes]"


def result_columns(result: Any, what: str) -> dict[str, Any]:
    """The journal's columns for a result (`ValueTooLarge` over `MAX_RESULT`): the
    result itself, or, over `INLINE_RESULT`, only its size (then `store_apart` it in
    the same transaction, once the journal entry is written)."""
    size = check_size(result, what, MAX_RESULT)
    if size <= INLINE_RESULT:
        return {"result": result, "result_size": None}
    return {"result": None, "result_size": size}


def store_apart(conn: Connection, workflow_id: str, name: str, result: Any) -> None:
    """Keep a journal entry's large result in the side table."""
    key = (results_t.c.workflow_id == workflow_id) & (results_t.c.name == name)
    conn.execute(delete(results_t).where(key))
    conn.execute(insert(results_t).values(workflow_id=workflow_id, name=name, result=result))


def drop_results(conn: Connection, workflow_id: str, names: list[str]) -> None:
    """Delete the side table's results of these journal entries (dropped by a restart)."""
    if names:
        conn.execute(
            delete(results_t).where(
                results_t.c.workflow_id == workflow_id, results_t.c.name.in_(names)
            )
        )


def load_results(conn: Connection, workflow_id: str, names: list[str]) -> dict[str, Any]:
    """The side table's results of these journal entries."""
    if not names:
        return {}
    rows = conn.execute(
        select(results_t.c.name, results_t.c.result).where(
            results_t.c.workflow_id == workflow_id, results_t.c.name.in_(names)
        )
    ).all()
    return {r.name: r.result for r in rows}
