"""Progress and log lines: what a running workflow reports about itself.

Both are written from deterministic workflow code, which runs again on every replay.
So each call is numbered by its ordinal in the code: progress is stored only over a
lower ordinal (a replay's earlier calls never move it back), and a log line whose
ordinal is stored already is not stored again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, insert, select, update

from retrier.engine import ms_to_datetime

from ._limits import cut_log
from ._models import RUNNING, logs_t, workflows_t

if TYPE_CHECKING:
    from ._journal import Journal

LEVELS = ("debug", "info", "warning", "error")
_log = logging.getLogger("tiers.workflow")


@dataclass(frozen=True, slots=True)
class LogLine:
    """A line a workflow logged with `ctx.log`, kept with the journal entry it had
    reached (`step`, None before its first call)."""

    seq: int  # its ordinal in the workflow's code, from 1
    step: str | None
    level: str  # debug | info | warning | error
    message: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "step": self.step,
            "level": self.level,
            "message": self.message,
            "at": self.at.isoformat(),
        }


def log_line(row: Any) -> LogLine:
    return LogLine(row.seq, row.step, row.level, row.message, ms_to_datetime(row.created_ms))


class Progress:
    """Progress and log lines of one database (a part of `Journal`)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def set_progress(self, workflow_id: str, seq: int, value: Any) -> bool:
        """Store `value` as the running workflow's progress, unless a call with a
        higher ordinal (`seq`) stored one already; whether it did."""
        with self._journal.write() as conn:
            changed = conn.execute(
                update(workflows_t)
                .where(
                    workflows_t.c.id == workflow_id,
                    workflows_t.c.state == RUNNING,
                    workflows_t.c.progress_seq < seq,
                )
                .values(progress=value, progress_seq=seq)
            ).rowcount
            if changed:
                self._journal.notify(conn, workflow_id)
        return bool(changed)

    def add_logs(self, workflow_id: str, lines: list[dict[str, Any]]) -> int:
        """Store the lines (rows of tiers_workflow_logs) whose ordinal is not stored
        yet; how many were new. A concurrent driver storing the same lines first
        raises `Conflict`."""
        seqs = [line["seq"] for line in lines]
        with self._journal.write() as conn:
            have = set(
                conn.execute(
                    select(logs_t.c.seq).where(
                        logs_t.c.workflow_id == workflow_id, logs_t.c.seq.in_(seqs)
                    )
                ).scalars()
            )
            new = [line for line in lines if line["seq"] not in have]
            if new:
                conn.execute(insert(logs_t), new)
                self._journal.notify(conn, workflow_id)
        return len(new)

    def forget(self, conn: Connection, workflow_id: str) -> None:
        """For a workflow that runs its code again from the start (a restart): its
        log lines deleted and its progress's ordinal reset, so the new run's calls
        are stored (its progress value stays until the new run sets one)."""
        conn.execute(delete(logs_t).where(logs_t.c.workflow_id == workflow_id))
        conn.execute(
            update(workflows_t).where(workflows_t.c.id == workflow_id).values(progress_seq=0)
        )

    def logs(self, workflow_id: str, after_seq: int = 0, limit: int = 1000) -> list[LogLine]:
        """A workflow's log lines after ordinal `after_seq`, in order."""
        with self._journal.dialect.read() as conn:
            rows = conn.execute(
                select(logs_t)
                .where(logs_t.c.workflow_id == workflow_id, logs_t.c.seq > after_seq)
                .order_by(logs_t.c.seq)
                .limit(limit)
            ).all()
        return [log_line(r) for r in rows]


class Reporter:
    """The progress and log lines of one driver pass, written in the background in
    call order (one write at a time, coalesced), and awaited with the pass's calls."""

    def __init__(self, journal: Journal, workflow_id: str, store_call: Any) -> None:
        self._journal = journal
        self._workflow_id = workflow_id
        self._store_call = store_call
        self._progress_seq = 0
        self._log_seq = 0
        self._progress: tuple[int, Any] | None = None  # the latest not written yet
        self._lines: list[dict[str, Any]] = []
        self._writing = False

    def progress(self, value: Any) -> bool:
        """Note a new progress value; True if a writer must be started."""
        self._progress_seq += 1
        self._progress = (self._progress_seq, value)
        return self._start()

    def log(self, level: str, message: str, step: str | None, now_ms: int) -> bool:
        """Note a log line; True if a writer must be started."""
        self._log_seq += 1
        self._lines.append(
            {
                "workflow_id": self._workflow_id,
                "seq": self._log_seq,
                "step": step,
                "level": level,
                "message": cut_log(message),
                "created_ms": now_ms,
            }
        )
        return self._start()

    def _start(self) -> bool:
        if self._writing:
            return False
        self._writing = True
        return True

    async def write(self) -> None:
        """Write what is noted until nothing is left. A failure is only logged: the
        workflow goes on, and its next replay writes what was lost."""
        try:
            while self._progress is not None or self._lines:
                progress, self._progress = self._progress, None
                lines, self._lines = self._lines, []
                try:
                    if progress is not None:
                        await self._store_call(
                            self._journal.progress.set_progress, self._workflow_id, *progress
                        )
                    if lines:
                        await self._store_call(
                            self._journal.progress.add_logs, self._workflow_id, lines
                        )
                except Exception as exc:
                    _log.debug("workflow %s: progress or log not stored: %s",
                               self._workflow_id, exc)
        finally:
            self._writing = False


class WorkflowLog:
    """`ctx.log`: lines kept with the workflow, each with the journal entry it had
    reached; shown by `steps()`, `watch()`, `tiers workflows show` and the dashboard.

    Calls are plain (not awaited) and never fail the workflow; a replay that logs the
    same lines again stores nothing twice. `msg % args` as with `logging`.
    """

    def __init__(self, emit: Callable[[str, str], None]) -> None:
        self._emit = emit

    def debug(self, msg: str, *args: Any) -> None:
        self._emit("debug", _format(msg, args))

    def info(self, msg: str, *args: Any) -> None:
        self._emit("info", _format(msg, args))

    def warning(self, msg: str, *args: Any) -> None:
        self._emit("warning", _format(msg, args))

    def error(self, msg: str, *args: Any) -> None:
        self._emit("error", _format(msg, args))


def _format(msg: Any, args: tuple[Any, ...]) -> str:
    text = str(msg)
    if args:
        try:
            return text % args
        except (TypeError, ValueError):
            return f"{text} {args!r}"
    return text
