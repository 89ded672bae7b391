"""Steps that a worker's drivers start in the same pass of its event loop, started in
one server-side call (PostgreSQL: `ServerCalls.start_many`).

Under load a worker's drivers move in step: the call that starts their steps returns to
all of them at once, each runs its step inline, and all ask for their next start in the
same pass of the loop. Each such start used to be a round trip, a statement and a commit
of its own (and a hop to a thread and back). Here the starts asked for in one pass wait
for the next pass, then go as one call (at most `MOST_PER_CALL` per call; more go as
several calls at once), which answers each as `ServerCalls.start_one` would have. A
lone start, under a trickle, goes alone through `start_one`, as before, one pass later.

As with any store call, a start once asked for is waited for even if its caller is
cancelled meanwhile: its write is never left half-known.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel

from retrier.engine import Claimed

from ._server_calls import MOST_PER_CALL, ServerCalls, StepStart, TryAlone

_Waiting = tuple[StepStart, "asyncio.Future[Claimed | None]"]
# At most this many calls of one event loop's starts under way at once: starts asked
# for meanwhile wait for one to end, and go together.
MOST_CALLS = 4


@dataclass(slots=True)
class _Lane:
    """One event loop's starts: those waiting to be sent, and its calls under way."""

    waiting: list[_Waiting] = field(default_factory=list)
    calls: int = 0
    sending: bool = False  # a `_send` is due in the loop's next pass


def _may_send(lane: _Lane) -> bool:
    """Whether a call may go now: none is under way, or a full one waits."""
    if not lane.waiting or lane.calls >= MOST_CALLS:
        return False
    return lane.calls == 0 or len(lane.waiting) >= MOST_PER_CALL


class StepBatches:
    """Sends the step starts of each event loop's pass as one call."""

    def __init__(
        self, server: ServerCalls, call: Callable[..., Awaitable[Any]]
    ) -> None:
        self.server = server
        self._call = call  # runs a blocking store call for async code (`Dialect.call`)
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane]
        self._lanes = weakref.WeakKeyDictionary()
        self._calls: set[asyncio.Task[None]] = set()  # (kept from the garbage collector)

    async def start(self, start: StepStart) -> Claimed | None:
        """`ServerCalls.start_one(start)`, made with the other starts of this pass."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Claimed | None] = loop.create_future()
        lane = self._lanes.get(loop)
        if lane is None:
            lane = self._lanes[loop] = _Lane()
        lane.waiting.append((start, future))
        self._send_soon(loop, lane)
        with anyio.CancelScope(shield=True):
            claimed = await future
        return claimed

    def _send_soon(self, loop: asyncio.AbstractEventLoop, lane: _Lane) -> None:
        if _may_send(lane) and not lane.sending:
            lane.sending = True
            loop.call_soon(self._send, loop, lane)

    def _send(self, loop: asyncio.AbstractEventLoop, lane: _Lane) -> None:
        lane.sending = False
        while _may_send(lane):
            batch = lane.waiting[:MOST_PER_CALL]
            del lane.waiting[:MOST_PER_CALL]
            lane.calls += 1
            task = loop.create_task(self._make(batch))
            self._calls.add(task)
            task.add_done_callback(partial(self._made, loop, lane))

    def _made(self, loop: asyncio.AbstractEventLoop, lane: _Lane, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        lane.calls -= 1
        self._send_soon(loop, lane)

    async def _make(self, batch: list[_Waiting]) -> None:
        """One call for `batch`; each start's future gets its answer as soon as known."""
        try:
            if len(batch) == 1:
                start, future = batch[0]
                _settle(future, await self._alone(start))
                return
            starts = [start for start, _ in batch]
            answers = await self._call(self.server.start_many, starts)
            alone = []
            for (start, future), answer in zip(batch, answers, strict=True):
                try:
                    future.set_result(self.server.answered(start, answer))
                except TryAlone:
                    alone.append((start, future))
                except Exception as exc:
                    future.set_exception(exc)
            for start, future in alone:
                _settle(future, await self._alone(start))
        except BaseException as exc:  # the call failed (and wrote nothing), or a shutdown
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise

    async def _alone(self, start: StepStart) -> Claimed | Exception | None:
        """`start_one(start)`: what it returned, or raised."""
        try:
            claimed: Claimed | None = await self._call(self.server.start_one, start)
        except Exception as exc:
            return exc
        return claimed


def _settle(future: asyncio.Future[Claimed | None], outcome: Claimed | Exception | None) -> None:
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
