"""Steps' starts and workflows' ends that a worker's drivers ask for in the same pass of
its event loop, made in one server-side call (PostgreSQL: `ServerCalls.many`).

Under load a worker's drivers move in step: the call that starts their steps returns to
all of them at once, each runs its step inline, and all ask for their next start (or
their end) in the same pass of the loop. Each such write used to be a round trip, a
statement and a commit of its own (and a hop to a thread and back). Here the writes
asked for in one pass wait for the next pass, then go as one call (at most
`MOST_PER_CALL` per call), which answers each as `ServerCalls.one` would have. While a
call is under way, the writes asked for meanwhile wait for it and go together; a
second call goes at once only for a full call's worth, and at most `MOST_CALLS` go at
once. A lone write, under a trickle, goes alone through `one`, as before, one pass
later.

As with any store call, a write once asked for is waited for even if its caller is
cancelled meanwhile: it is never left half-known.
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

from ._server_calls import MOST_PER_CALL, ServerCalls, StepStart, TryAlone, WorkflowEnd

Item = StepStart | WorkflowEnd
_Waiting = tuple[Item, "asyncio.Future[Any]"]
# At most this many calls of one event loop's writes under way at once.
MOST_CALLS = 4


@dataclass(slots=True)
class _Lane:
    """One event loop's writes: those waiting to be sent, and its calls under way."""

    waiting: list[_Waiting] = field(default_factory=list)
    calls: int = 0
    sending: bool = False  # a `_send` is due in the loop's next pass


def _may_send(lane: _Lane) -> bool:
    """Whether a call may go now: none is under way, or a full one waits."""
    if not lane.waiting or lane.calls >= MOST_CALLS:
        return False
    return lane.calls == 0 or len(lane.waiting) >= MOST_PER_CALL


class BatchedCalls:
    """Sends the prepared starts and ends of each event loop's pass as one call."""

    def __init__(self, server: ServerCalls, call: Callable[..., Awaitable[Any]]) -> None:
        self.server = server
        self._call = call  # runs a blocking store call for async code (`Dialect.call`)
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane]
        self._lanes = weakref.WeakKeyDictionary()
        self._calls: set[asyncio.Task[None]] = set()  # (kept from the garbage collector)

    async def make(self, item: Item) -> Any:
        """`ServerCalls.one(item)`, made with the other writes of this pass."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        lane = self._lanes.get(loop)
        if lane is None:
            lane = self._lanes[loop] = _Lane()
        lane.waiting.append((item, future))
        self._send_soon(loop, lane)
        with anyio.CancelScope(shield=True):
            answer = await future
        return answer

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

    def _made(
        self, loop: asyncio.AbstractEventLoop, lane: _Lane, task: asyncio.Task[None]
    ) -> None:
        self._calls.discard(task)
        lane.calls -= 1
        self._send_soon(loop, lane)

    async def _make(self, batch: list[_Waiting]) -> None:
        """One call for `batch`; each future gets its answer as soon as it is known."""
        try:
            if len(batch) == 1:
                item, future = batch[0]
                _settle(future, await self._alone(item))
                return
            answers = await self._call(self.server.many, [item for item, _ in batch])
            alone = []
            for (item, future), answer in zip(batch, answers, strict=True):
                try:
                    future.set_result(self.server.answered(item, answer))
                except TryAlone:
                    alone.append((item, future))
                except Exception as exc:
                    future.set_exception(exc)
            for item, future in alone:
                _settle(future, await self._alone(item))
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

    async def _alone(self, item: Item) -> Any:
        """`one(item)`: what it returned, or the exception it raised."""
        try:
            return await self._call(self.server.one, item)
        except Exception as exc:
            return exc


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
