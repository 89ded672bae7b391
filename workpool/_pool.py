"""`Workpool`: tier 2's public API. A pool is an engine queue with persisted limits.

Every limit lives in the `tiers_queues` row of the pool and is enforced by the
engine's claim transaction, so every worker process sharing the database honours
the same cap, rate limit and per-key limit; nothing here runs in the worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import anyio
from sqlalchemy import event
from sqlmodel import Session

from retrier import Completed, Debounce, InvalidSettings, Retrier, RunNotFound, Schedule, Why
from retrier.engine import (
    MAX_ATTEMPT_TIMEOUT,
    Fn,
    NewRun,
    QueueLimits,
    RunRow,
    check_flag,
    check_name,
    check_timeout,
    schedule_spec,
)

from ._behavior import RetryBehavior
from ._enqueue import Preparer, Retry
from ._errors import InvalidBatchItem, NotInPool
from ._group import PoolGroup
from ._settings import (
    DEFAULT_PRIORITY_AGING,
    RateLimit,
    check_parallelism,
    check_per_worker,
    pool_limits,
)
from ._status import WorkStatus, status_of

BatchItem = tuple[Fn | str, dict[str, Any] | None] | tuple[
    Fn | str, dict[str, Any] | None, Mapping[str, Any]
]


class Workpool:
    """Many actions, at most `max_parallelism` running at once across every process.

    >>> pool = Workpool(retrier, "emails", max_parallelism=10)
    >>> work_id = pool.enqueue(send_email, {"to": "a@b.c"}, on_complete=done, context={"u": 7})
    >>> pool.status(work_id)
    Pending(previous_attempts=0)

    The settings are stored in the database when the pool is constructed (and
    whenever `set_max_parallelism` or `set_max_per_worker` is called): the last
    writer wins, and workers apply a change at their next claim, without a restart.
    `max_parallelism=0` pauses the pool: nothing new starts, running items finish.
    `max_per_worker` spreads the pool over worker processes (for CPU-bound actions):
    no worker runs more than that many of its items at once.

    Among due items, higher `priority` starts first; an item due for longer than
    `priority_aging` (default one minute) starts before every item due after it,
    whatever their priorities, so no priority starves (`priority_aging=None`: due
    order, priority only breaks ties). `round_robin_keys=True` makes the items'
    keys take turns instead: one item per key per turn, due order within a key, so
    one key's backlog never delays another key's items. `rate_limit_per_key=(n,
    period)`: each key starts at most n items in any window of that period; and
    `set_key_limit` gives one key a cap of its own. Failed items are retried only
    if `retry=` (or `retry_actions_by_default`) says so; a retry waiting for its
    backoff holds no slot.

    `group=` (a `PoolGroup`, or its name) makes the pool share the group's cap with
    its other members, `guaranteed=` of its slots guaranteed (0: it only borrows what
    the others leave idle); see `PoolGroup` for the rule.

    `default_timeout` limits each attempt of an item whose action registers no
    `timeout` and whose `enqueue` gives none (a timedelta or seconds; None: no limit).
    An attempt past its limit fails and frees its slot at once.
    """

    def __init__(
        self,
        retrier: Retrier,
        name: str,
        *,
        max_parallelism: int = 10,
        retry_actions_by_default: bool = False,
        default_retry_behavior: RetryBehavior | None = None,
        rate_limit: RateLimit | None = None,
        max_per_key: int | None = None,
        max_per_worker: int | None = None,
        priority_aging: timedelta | float | None = DEFAULT_PRIORITY_AGING,
        round_robin_keys: bool = False,
        rate_limit_per_key: RateLimit | None = None,
        default_timeout: timedelta | float | None = None,
        group: PoolGroup | str | None = None,
        guaranteed: int = 0,
    ) -> None:
        self.retrier = retrier
        self.default_timeout = default_timeout
        # In milliseconds, checked (a workflow's steps in this pool use it too).
        self.default_timeout_ms = (
            None
            if default_timeout is None
            else check_timeout(default_timeout, "default_timeout", MAX_ATTEMPT_TIMEOUT)
        )
        self.name = name
        self.retry_actions_by_default = check_flag(
            retry_actions_by_default, "retry_actions_by_default"
        )
        self.default_retry_behavior = default_retry_behavior or RetryBehavior()
        if not isinstance(self.default_retry_behavior, RetryBehavior):
            raise InvalidSettings(
                f"default_retry_behavior must be a RetryBehavior, got {default_retry_behavior!r}"
            )
        self._limits = pool_limits(
            name,
            max_parallelism,
            rate_limit,
            max_per_key,
            max_per_worker,
            priority_aging,
            round_robin_keys,
            rate_limit_per_key,
            group.name if isinstance(group, PoolGroup) else group,
            guaranteed,
        )
        self._preparer = Preparer(
            retrier,
            name,
            retry_actions_by_default,
            self.default_retry_behavior,
            self.default_timeout_ms,
        )
        if retrier.store.get_queue(name) != self._limits:
            self._store_limits(self._limits)

    # -- settings ------------------------------------------------------------------------

    @property
    def max_parallelism(self) -> int:
        """The cap this object last wrote (another process may have changed it since)."""
        assert self._limits.max_parallelism is not None
        return self._limits.max_parallelism

    @property
    def limits(self) -> QueueLimits:
        """The limits as stored in the database now."""
        return self.retrier.store.get_queue(self.name) or self._limits

    def set_max_parallelism(self, max_parallelism: int) -> None:
        """Change the cap for every worker, at their next claim; 0 pauses the pool.

        Lowering it never stops running items: no new one starts until fewer than
        the new cap are running.
        """
        check_parallelism(max_parallelism)
        current = self.retrier.store.get_queue(self.name) or self._limits
        self._store_limits(dataclasses.replace(current, max_parallelism=max_parallelism))

    def set_max_per_worker(self, max_per_worker: int | None) -> None:
        """Change how many of the pool's items one worker may run at once (None: no
        limit but the pool's cap and the worker's concurrency), at every worker's next
        claim. Lowering it never stops running items."""
        check_per_worker(max_per_worker)
        current = self.retrier.store.get_queue(self.name) or self._limits
        self._store_limits(dataclasses.replace(current, max_per_worker=max_per_worker))

    def set_key_limit(
        self, key: str, *, max_parallelism: int | None, session: Session | None = None
    ) -> None:
        """Give one key (a tenant) a cap of its own: at most `max_parallelism` of its
        items run at once, across every process, instead of `max_per_key` (which
        may be None: then only keys with a cap of their own are limited). 0 pauses
        the key; None removes its cap. Stored as data: workers apply it at their next
        claim. With `session=`, it is written in that session's transaction and takes
        effect only if the caller commits. Lowering it never stops running items."""
        check_name(key, "a key")
        if max_parallelism is not None:
            check_parallelism(max_parallelism)
        if session is None:
            self.retrier.store.set_key_limit(self.name, key, max_parallelism)
            self.retrier.wake_workers()
            return
        self.retrier.store.set_key_limit(self.name, key, max_parallelism, session.connection())
        event.listen(session, "after_commit", lambda _s: self.retrier.wake_workers(), once=True)

    def key_limits(self) -> dict[str, int]:
        """The keys that have a cap of their own, and their caps, as stored now."""
        return self.retrier.store.key_limits(self.name)

    def _store_limits(self, limits: QueueLimits) -> None:
        self.retrier.store.set_queue(limits)
        self._limits = limits
        self.retrier.wake_workers()  # in-process workers; others get NOTIFY or poll

    # -- enqueue -------------------------------------------------------------------------

    def enqueue(
        self,
        fn: Fn | str,
        args: dict[str, Any] | None = None,
        *,
        on_complete: Fn | str | None = None,
        context: Any = None,
        retry: Retry = None,
        run_at: datetime | None = None,
        run_after: timedelta | float | None = None,
        priority: int = 0,
        key: str | None = None,
        idempotency_key: str | None = None,
        debounce: Debounce | None = None,
        session: Session | None = None,
        timeout: timedelta | float | None = None,
    ) -> str:
        """Add one item to the pool; returns its work id.

        `retry`: True (the pool's default behaviour), False (one attempt) or a
        `RetryBehavior`; None follows `retry_actions_by_default`. `key` is the
        concurrency key: it groups items for `max_per_key`. With `session=`, the item
        is written in that session's transaction and exists only if the caller commits.

        `idempotency_key`: while an item of this pool with that key is stored, the call
        returns its id and adds nothing (once it is deleted, the key is free again).
        `debounce=Debounce(key, period, max_wait)`: calls within `period` collapse into
        one item with the latest args, starting `period` after the last call and no
        later than `max_wait` after the first; every such call returns its id.
        `timeout` limits each attempt (a timedelta or seconds; default: the action's
        registered `timeout`, else the pool's `default_timeout`, else none).
        """
        options = {
            "on_complete": on_complete,
            "context": context,
            "retry": retry,
            "run_at": run_at,
            "run_after": run_after,
            "priority": priority,
            "key": key,
            "idempotency_key": idempotency_key,
            "debounce": debounce,
            "timeout": timeout,
        }
        new = self._preparer.prepare(fn, args, options, self.retrier.clock.now_ms())
        return self.retrier.submit([new], session=session)[0]

    def enqueue_batch(
        self, items: Iterable[BatchItem], *, session: Session | None = None
    ) -> list[str]:
        """Add many items in one transaction; returns their work ids, in order.

        Each item is `(fn, args)` or `(fn, args, options)`, where `options` holds
        keyword arguments of `enqueue`. Every item is validated before anything is
        written: if one is invalid, `InvalidBatchItem` names it and nothing is stored.
        Items of one batch share one due time, so `priority` orders them. An item
        with an `idempotency_key` already stored (or given earlier in the batch) gets
        that item's id; a debounced one, the id of the item it collapses into.
        """
        listed = list(items)
        now = self.retrier.clock.now_ms()
        prepared: list[NewRun] = []
        for index, item in enumerate(listed):
            try:
                prepared.append(self._prepare_item(item, now))
            except Exception as exc:
                raise InvalidBatchItem(index, len(listed), exc) from exc
        return self.retrier.submit(prepared, session=session)

    def _prepare_item(self, item: BatchItem, now: int) -> NewRun:
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise InvalidSettings(f"expected (fn, args) or (fn, args, options), got {item!r}")
        options: Mapping[str, Any] = item[2] if len(item) == 3 else {}
        if not isinstance(options, Mapping):
            raise InvalidSettings(f"options must be a dict, got {options!r}")
        return self._preparer.prepare(item[0], item[1], options, now)

    def schedule(
        self,
        name: str,
        fn: Fn | str,
        args: dict[str, Any] | None = None,
        *,
        cron: str,
        timezone: str = "UTC",
        missed: str = "latest",
        on_complete: Fn | str | None = None,
        context: Any = None,
        retry: Retry = None,
        priority: int = 0,
        key: str | None = None,
        timeout: timedelta | float | None = None,
    ) -> Schedule:
        """Enqueue `fn(**args)` in this pool at every tick of `cron` in `timezone`,
        once per tick across every worker; returns the stored schedule.

        The schedule works as `Retrier.schedule` says (declared again: updated; a
        missed tick: as `missed` says; `unschedule` to delete it); each tick's item
        takes the pool's limits and the options `enqueue` would (`retry`, `priority`,
        `key`, `on_complete`, `context`, `timeout`).

        >>> pool.schedule("hourly-sync", sync_accounts, {}, cron="0 * * * *")
        """
        options = {
            "on_complete": on_complete,
            "context": context,
            "retry": retry,
            "priority": priority,
            "key": key,
            "timeout": timeout,
        }
        new = self._preparer.prepare(fn, args, options, self.retrier.clock.now_ms())
        spec = schedule_spec(name, "pool", new, cron=cron, timezone=timezone, missed=missed)
        return self.retrier.declare_schedule(spec)

    # -- status, cancel, wait ----------------------------------------------------------------

    def status(self, work_id: str) -> WorkStatus:
        """`Pending(previous_attempts)`, `Running(previous_attempts)` or `Finished()`.

        Raises `RunNotFound` for an unknown id, `NotInPool` for another pool's item.
        """
        return status_of(self._own(work_id))

    def status_batch(self, work_ids: Sequence[str]) -> list[WorkStatus]:
        """The status of each id, in order (errors as for `status`)."""
        rows = self.retrier.store.get_many(work_ids)
        return [status_of(self._check(rows.get(work_id), work_id)) for work_id in work_ids]

    def explain(self, work_id: str) -> Why:
        """Why the item is where it is (see `Retrier.explain`): its pool full or
        paused, its key or rate window, its backoff, no worker, ..."""
        self._own(work_id)
        return self.retrier.explain(work_id)

    async def explain_async(self, work_id: str) -> Why:
        return await anyio.to_thread.run_sync(self.explain, work_id)

    def cancel(self, work_id: str) -> None:
        """Cancel an item: a pending one never starts; a running one may finish, but
        is not retried, and its result is discarded. on_complete gets `Canceled()`."""
        self._own(work_id)
        self.retrier.cancel(work_id)

    def cancel_all(self, limit: int | None = None) -> int:
        """Cancel every unfinished item of the pool (at most `limit`, running ones
        first), in one transaction: no item starts while it runs, and items that
        finish meanwhile are not counted. Returns how many were canceled."""
        return self.retrier.cancel_queue(self.name, limit)

    def wait(self, work_id: str, timeout: float | None = None) -> Completed:
        """Block until the item has finished and its on_complete has run.

        Returns the retrier's `Completed(Success(value) | Failed(error) | Canceled())`;
        raises `WaitTimeout` after `timeout` seconds.
        """
        self._own(work_id)
        return self.retrier.wait(work_id, timeout=timeout)

    def _own(self, work_id: str) -> RunRow:
        return self._check(self.retrier.store.get_many([work_id]).get(work_id), work_id)

    def _check(self, row: RunRow | None, work_id: str) -> RunRow:
        if row is None:
            raise RunNotFound(work_id)
        if row.queue != self.name:
            raise NotInPool(work_id, self.name, row.queue)
        return row

    # -- async twins ---------------------------------------------------------------------------

    async def enqueue_async(
        self, fn: Fn | str, args: dict[str, Any] | None = None, **options: Any
    ) -> str:
        return await anyio.to_thread.run_sync(partial(self.enqueue, fn, args, **options))

    async def schedule_async(
        self, name: str, fn: Fn | str, args: dict[str, Any] | None = None, **options: Any
    ) -> Schedule:
        return await anyio.to_thread.run_sync(partial(self.schedule, name, fn, args, **options))

    async def enqueue_batch_async(self, items: Iterable[BatchItem]) -> list[str]:
        return await anyio.to_thread.run_sync(self.enqueue_batch, list(items))

    async def status_async(self, work_id: str) -> WorkStatus:
        return await anyio.to_thread.run_sync(self.status, work_id)

    async def status_batch_async(self, work_ids: Sequence[str]) -> list[WorkStatus]:
        return await anyio.to_thread.run_sync(self.status_batch, work_ids)

    async def cancel_async(self, work_id: str) -> None:
        await anyio.to_thread.run_sync(self.cancel, work_id)

    async def cancel_all_async(self, limit: int | None = None) -> int:
        return await anyio.to_thread.run_sync(self.cancel_all, limit)

    async def set_max_parallelism_async(self, max_parallelism: int) -> None:
        await anyio.to_thread.run_sync(self.set_max_parallelism, max_parallelism)

    async def set_max_per_worker_async(self, max_per_worker: int | None) -> None:
        await anyio.to_thread.run_sync(self.set_max_per_worker, max_per_worker)

    async def set_key_limit_async(self, key: str, *, max_parallelism: int | None) -> None:
        await anyio.to_thread.run_sync(
            partial(self.set_key_limit, key, max_parallelism=max_parallelism)
        )

    async def wait_async(
        self,
        work_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors wait(work_id, timeout=...)
    ) -> Completed:
        """`wait` without holding a thread while waiting."""
        await anyio.to_thread.run_sync(self._own, work_id)
        return await self.retrier.wait_async(work_id, timeout)

    def __repr__(self) -> str:
        group = self._limits.group_name
        grouped = (
            "" if group is None else f", group={group!r}, guaranteed={self._limits.guaranteed}"
        )
        return f"Workpool({self.name!r}, max_parallelism={self.max_parallelism}{grouped})"
