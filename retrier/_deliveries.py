"""Delivering on_complete: calling a run's handler with its result and context, and
marking the delivery done, exactly once for a handler's writes through its session.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Connection
from sqlmodel import Session

from ._dialects import is_transient
from ._errors import UnregisteredFunction, describe
from ._log import run_extra
from ._models import CANCELED, FAILED, SUCCESS
from ._registry import Registry
from ._results import Canceled, Failed, RunResult, Success
from ._run_types import Claimed, Delivery
from ._store import Store
from ._stored_json import unreadable
from ._telemetry import Telemetry

log = logging.getLogger("tiers.worker")

T = TypeVar("T")
# How a worker runs a store call that must survive a database blip (`Worker._persist`).
Persist = Callable[[Callable[[], Awaitable[Any]], str], Awaitable[Any]]


class Deliveries:
    """The on_complete deliveries of one worker."""

    def __init__(
        self, store: Store, registry: Registry, persist: Persist, telemetry: Telemetry
    ) -> None:
        self.store = store
        self.registry = registry
        self._persist = persist
        self.telemetry = telemetry

    async def deliver(self, f: Delivery) -> list[str]:
        """Call `f`'s on_complete and mark it delivered; the runs now completed."""
        if not self.telemetry.active:
            return await self._deliver(f)
        with self.telemetry.delivery(f):
            return await self._deliver(f)

    async def _deliver(self, f: Delivery) -> list[str]:
        try:
            reg = self.registry.handler(f.on_complete)
        except UnregisteredFunction:
            # Another worker (a newer release) may have it: hand the delivery back.
            await anyio.to_thread.run_sync(self.store.release_delivery, f)
            return []
        what = f"delivering on_complete of run {f.id}"
        if reg.takes_session:
            # The handler's writes commit with the delivery: retrying the whole
            # transaction after a blip cannot apply them twice.
            session_delivery = partial(self.store.run_session_delivery, f, self.in_session)
            ok = await self._persist(partial(anyio.to_thread.run_sync, session_delivery), what)
            return [f.id] if ok else []
        failures: dict[str, str] = {}
        try:
            args = (f.id, self.result_of(f), context_of(f))
            if reg.is_async:
                await reg.fn(*args)
            else:
                await anyio.to_thread.run_sync(partial(reg.fn, *args))
        except Exception as exc:
            self._failed(f, exc)
            failures[f.id] = describe(exc)
        delivered = partial(self.store.delivered, [f], failures)
        completed: list[str] = await self._persist(
            partial(self.store.dialect.call, delivered), what
        )
        return completed

    def in_session(self, f: Delivery, conn: Connection) -> None:
        """Call `f`'s on_complete with a session on `conn` (the transaction that marks
        it delivered): its writes commit or roll back with that transaction."""
        reg = self.registry.handler(f.on_complete)
        try:
            with (
                self.telemetry.delivery(f),
                Session(bind=conn, join_transaction_mode="rollback_only") as session,
            ):
                reg.fn(f.id, self.result_of(f), context_of(f), session=session)
                session.flush()
        except Exception as exc:
            if not is_transient(exc):  # else the database failed, not the handler
                self._failed(f, exc)
            raise

    def _failed(self, f: Delivery, exc: Exception) -> None:
        """A handler raised: it is retried with backoff (up to 5 times)."""
        extra = run_extra(f.id, f.fn, None, f.queue)
        extra.update(handler=f.on_complete, error=describe(exc))
        log.warning(
            "on_complete %s of run %s raised: %s", f.on_complete, f.id, exc,
            exc_info=exc, extra=extra,
        )
        if self.telemetry.metrics is not None:
            self.telemetry.metrics.handler_failed(f.on_complete)

    def result_of(self, f: Delivery) -> RunResult:
        """The result a handler gets, typed by the action's return annotation."""
        corrupt = unreadable("result", f.result) if f.outcome == SUCCESS else None
        if corrupt is not None:
            return Failed(f"CorruptRun: {corrupt}")
        if f.outcome == SUCCESS:
            try:
                value = self.registry.action(f.fn).decode_result(f.result)
            except UnregisteredFunction:
                value = f.result
            return Success(value)
        if f.outcome == FAILED:
            return Failed(f.error or "failed")
        return Canceled()


def finished_from(c: Claimed) -> Delivery:
    """A claimed delivery, as the run it delivers."""
    return Delivery(
        id=c.id,
        fn=c.fn,
        fence=c.fence,
        outcome=c.outcome or CANCELED,
        result=c.result,
        error=c.error,
        on_complete=c.on_complete or "",
        context=c.context,
        queue=c.queue,
        owner=c.owner,
        trace=c.trace,
    )


def context_of(f: Delivery) -> Any:
    """The context an on_complete gets: None if the stored one cannot be decoded (the
    run has failed with that error then)."""
    return None if unreadable("context", f.context) else f.context
