"""A Retrier's own worker for the length of a `with` block: on a background thread's
event loop (`with retrier:`), or as a task of the caller's loop (`async with`)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from types import TracebackType

import anyio
import anyio.from_thread

from ._worker import Worker


class OnThread:
    """`worker` served on an event loop of its own, in a background thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        portal = self._portal_cm.__enter__()
        try:
            self._serving, _ = portal.start_task(worker.serve)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise

    def stop(self) -> None:
        """Stop the worker, wait until it has finished its work, end the thread."""
        self.worker.stop()
        try:
            self._serving.result()
        finally:
            self._portal_cm.__exit__(None, None, None)


class AsTask:
    """`worker` served as a task of the current event loop."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack

    @classmethod
    async def start(cls, worker: Worker) -> AsTask:
        stack = AsyncExitStack()
        tg = await stack.enter_async_context(anyio.create_task_group())
        await tg.start(worker.serve)
        stack.push_async_callback(_stop_worker, worker)
        return cls(stack)

    async def stop(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The worker stops and finishes its work whatever the body did, so an error of
        # the body comes out as itself, not wrapped with the worker's own shutdown.
        # Only a cancellation goes into the task group: it cancels the worker's tasks.
        if exc is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
            await self._stack.__aexit__(exc_type, exc, tb)
        else:
            await self._stack.__aexit__(None, None, None)


async def _stop_worker(worker: Worker) -> None:
    worker.stop()
