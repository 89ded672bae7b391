"""Waiting for workflows to finish (`WorkflowManager.wait`, `wait_all`): poll their
states a slice at a time, woken early when a workflow ends in this process; read the
finished rows once, at the end; then wait for their on_complete runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

from retrier import Retrier, RunNotFound, WaitTimeout
from retrier.engine import Changes, all_reached, poll_until, poll_until_async

from ._errors import WorkflowNotFound
from ._journal import Journal
from ._models import FINISHED, WorkflowRow


class Waits:
    """The waits of one manager: its journal, its retrier (for on_complete runs) and
    what announces the ends of workflows driven in this process."""

    def __init__(self, journal: Journal, retrier: Retrier, ended: Changes) -> None:
        self.journal = journal
        self.retrier = retrier
        self.ended = ended

    def wait_all(self, ids: Sequence[str], timeout: float | None) -> list[WorkflowRow]:
        """The rows of the workflows `ids`, in order, once each has finished and its
        on_complete has run. `WaitTimeout` after `timeout` seconds; `WorkflowNotFound`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = set(ids)
        poll_until(*self._poll(remaining, timeout))
        rows = self.journal.rows(list(dict.fromkeys(ids)))
        handled = [i for i in rows if rows[i].on_complete is not None]
        while handled:
            try:
                self.retrier.wait_all(handled, timeout=_left(deadline))
                break
            except RunNotFound:  # cleaned up meanwhile: its on_complete ran long ago
                handled = self._still_stored(handled)
        return [rows[i] for i in ids]

    async def wait_all_async(
        self,
        ids: Sequence[str],
        timeout: float | None,  # noqa: ASYNC109 - mirrors wait_all(ids, timeout=...)
    ) -> list[WorkflowRow]:
        """`wait_all` without holding a thread while waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = set(ids)
        await poll_until_async(*self._poll(remaining, timeout))
        rows = await self.retrier.store.dialect.call(
            self.journal.rows, list(dict.fromkeys(ids))
        )
        handled = [i for i in rows if rows[i].on_complete is not None]
        while handled:
            try:
                await self.retrier.wait_all_async(handled, _left(deadline))
                break
            except RunNotFound:  # cleaned up meanwhile: its on_complete ran long ago
                handled = await self.retrier.store.dialect.call(self._still_stored, handled)
        return [rows[i] for i in ids]

    def _poll(
        self, remaining: set[str], timeout: float | None
    ) -> tuple[Callable[[], bool | None], Changes, float | None, Callable[[], Exception]]:
        return (
            self.retrier.watched(partial(self._all_finished, remaining)),
            self.ended,
            timeout,
            lambda: WaitTimeout(next(iter(remaining)), timeout or 0),
        )

    def _all_finished(self, remaining: set[str]) -> bool | None:
        """True once every workflow in `remaining` has finished; removes those that
        have (a slice at a time, as a wait for runs reads them)."""
        return all_reached(remaining, self.journal.states, FINISHED, WorkflowNotFound)

    def _still_stored(self, run_ids: list[str]) -> list[str]:
        """The on_complete runs (a workflow's has its id) not cleaned up yet."""
        stored = self.retrier.store.states(run_ids)
        return [i for i in run_ids if i in stored]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
