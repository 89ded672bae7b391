"""The outcomes of a workflow pass's inline steps, until they are stored.

A step that succeeds inline returns to the workflow function at once; its outcome is
stored in the transaction of the workflow's next write (the next step's start, a
sleep, the workflow's end), which commits only if every such outcome completes. So a
step costs one transaction, and nothing is journaled after a step whose result is not
stored. Until then the worker holds (and heartbeats) its run; a crash leaves it to its
lease, and it runs again.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
from sqlalchemy import Connection

from retrier.engine import Delivery, Outcome, Worker

from ._journal import Journal
from ._journal_reads import Entry
from ._journal_signals import Unsettled
from ._models import COMPLETED
from ._server_calls import Previous, SimpleSettle


class InlineOutcomes:
    """One workflow pass's inline outcomes: `pending` (not stored yet), the step each
    held run is for (`steps`), and the journal entries their records wrote
    (`journaled`, until read)."""

    def __init__(
        self,
        workflow_id: str,
        journal: Journal,
        worker: Worker | None,
        store_call: Callable[..., Any],
    ) -> None:
        self.workflow_id = workflow_id
        self.journal = journal
        self.worker = worker
        self.store_call = store_call
        self.pending: list[Outcome] = []
        self.steps: dict[str, str] = {}  # run id -> step name
        self.journaled: dict[str, Entry] = {}  # run id -> its journal entry, once stored

    def take(self) -> list[Outcome]:
        """The pending outcomes, for a write to store (no longer pending)."""
        taken, self.pending = self.pending, []
        return taken

    def settler(
        self, taken: list[Outcome], *, starts_step: bool = False
    ) -> Callable[[Connection], None] | None:
        """What stores `taken` inside another write's transaction; it raises
        `Unsettled` (rolling that transaction back) unless each completes.
        `starts_step`: that transaction starts a step, which takes a freed slot again."""
        if not taken:
            return None
        worker = self.worker
        assert worker is not None
        wake_waiting = not starts_step or len(taken) > 1

        def settle(conn: Connection) -> None:
            recorded = worker.record_claimed(
                conn, taken, self.journal_inline, wake_waiting=wake_waiting
            )
            ok = [self.journaled.pop(i, None) for i in recorded.completed]
            if len(ok) != len(taken) or any(e is None or e.state != COMPLETED for e in ok):
                raise Unsettled

        return settle

    def simple(self, taken: list[Outcome]) -> SimpleSettle | None:
        """`taken`, where a server-side call (a step's start, the workflow's end:
        `_server_calls`) may store it: nothing, or one inline step's success."""
        worker = self.worker
        if worker is None or len(taken) > 1:
            return None
        if not taken:
            return SimpleSettle(None, _nothing, worker.id)
        o = taken[0]
        name = self.steps.get(o.run_id)
        if o.kind != "success" or name is None:
            return None
        previous = Previous(o.run_id, o.fence, o.result, o.started_ms, name)
        return SimpleSettle(previous, partial(worker.recorded_elsewhere, taken), worker.id)

    def settled(self, taken: list[Outcome]) -> None:
        """After the transaction of `settler(taken)` committed."""
        if taken:
            assert self.worker is not None
            ids = [o.run_id for o in taken]
            self.worker.release_claimed(ids, ids)
            for run_id in ids:
                self.steps.pop(run_id, None)

    async def settle_alone(self, outcomes: list[Outcome]) -> bool:
        """Store outcomes in a transaction of their own; whether each completed."""
        if not outcomes:
            return True
        assert self.worker is not None
        with anyio.CancelScope(shield=True):
            recorded = await self.store_call(
                self.worker.settle_claimed, outcomes, self.journal_inline
            )
        for o in outcomes:
            self.steps.pop(o.run_id, None)
        return len(recorded.completed) == len(outcomes)

    def settle_now(self) -> None:
        """Store any unsettled outcome, blocking (for a driver cancelled from outside)."""
        taken = self.take()
        if taken:
            assert self.worker is not None
            self.worker.settle_claimed(taken, self.journal_inline)

    def journal_inline(self, f: Delivery, conn: Connection) -> None:
        """The on_complete of an inline step's run, in the transaction recording it."""
        name = self.steps.get(f.id)
        if name is None:
            return
        entry = self.journal.settle_step(
            conn,
            self.workflow_id,
            name,
            f.outcome,
            f.result,
            f.error,
            f.id,
            attempts=1,  # an inline run that is over at once had one attempt
        )
        if entry is not None:
            self.journaled[f.id] = entry


def _nothing() -> None:
    """What a server-side call that stored no earlier outcome does after it."""
