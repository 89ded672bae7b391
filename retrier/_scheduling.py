"""The `Retrier`'s cron schedules: declared in code, stored in `tiers_schedules`,
fired by whichever worker sees a tick first (once per tick, see `_schedules.py`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from ._checks import check_name
from ._cron import MISSED_POLICIES, parse_cron
from ._errors import InvalidSchedule
from ._registry import Fn
from ._run_types import NewRun
from ._schedules import Schedule, ScheduleSpec

if TYPE_CHECKING:
    from ._policy import RetryPolicy
    from ._registry import Registry
    from ._store import Store

MAX_SCHEDULE_NAME = 150
"""Most characters in a schedule's name (a workflow's start key is built from it)."""


def schedule_spec(
    name: Any,
    target: str,
    run: NewRun,
    *,
    cron: Any,
    timezone: Any,
    missed: Any,
    tick_arg: str | None = None,
) -> ScheduleSpec:
    """Check a schedule's settings and build what declaring it stores; raises
    `InvalidSchedule` naming the setting that is wrong."""
    check_name(name, "a schedule name", max_length=MAX_SCHEDULE_NAME, error=InvalidSchedule)
    parsed = parse_cron(cron, timezone)
    if missed not in MISSED_POLICIES:
        raise InvalidSchedule(
            f"missed must be one of {', '.join(map(repr, MISSED_POLICIES))}, got {missed!r}"
        )
    return ScheduleSpec(name, target, run, parsed, missed, tick_arg)


class Scheduling:
    """Cron schedules of a `Retrier` (its base class: the methods are the Retrier's)."""

    if TYPE_CHECKING:
        store: Store
        registry: Registry
        policy: RetryPolicy

        prepare: Callable[..., NewRun]
        wake_workers: Callable[[], None]

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
        initial_backoff_ms: int | None = None,
        base: float | None = None,
        max_failures: int | None = None,
        jitter: bool | None = None,
        max_backoff: timedelta | None = None,
    ) -> Schedule:
        """Run `fn(**args)` at every tick of `cron` in `timezone`, once per tick across
        every worker sharing the database; returns the stored schedule.

        Declare schedules where the app starts: declaring again updates the stored
        schedule of that `name` (its next tick is kept unless `cron` or `timezone`
        changed; a paused schedule stays paused). A schedule removed from the code
        stays stored until `unschedule(name)` or `tiers schedules delete NAME`.

        `cron`: five fields (minute hour day month weekday, Sunday is 0 or 7), six
        with seconds first, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
        `missed`: what ticks missed while no worker ran (more than a minute late) do:
        `"latest"` runs once for the latest of them, `"all"` runs each, `"none"`
        skips them. Raises `InvalidSchedule` (an `InvalidSettings`), `UnregisteredFunction`
        or `InvalidArguments` before anything is written.

        >>> retrier.schedule("nightly-report", send_report, {"to": "ops@example.com"},
        ...                  cron="0 3 * * *", timezone="Europe/Paris")
        """
        policy = self.policy.with_overrides(
            initial_backoff_ms=initial_backoff_ms,
            base=base,
            max_failures=max_failures,
            jitter=jitter,
            max_backoff=max_backoff,
        )
        run = self.prepare(fn, args, on_complete=on_complete, context=context, policy=policy)
        spec = schedule_spec(name, "run", run, cron=cron, timezone=timezone, missed=missed)
        return self.declare_schedule(spec)

    def declare_schedule(self, spec: ScheduleSpec) -> Schedule:
        """Store a checked schedule (see `schedule_spec`): for higher tiers, whose
        ticks start a pool's item or a workflow."""
        declared = self.store.declare_schedule(spec)
        self.wake_workers()
        return declared

    def unschedule(self, name: str) -> bool:
        """Delete a schedule (the runs it started stay); False if there was none.
        For a schedule removed from the code: call it once, or `tiers schedules
        delete NAME`."""
        return self.store.delete_schedule(name)

    def schedules(self) -> list[Schedule]:
        """Every stored schedule, by name, with its next and last tick."""
        return self.store.list_schedules()

    def get_schedule(self, name: str) -> Schedule:
        """One stored schedule; raises `ScheduleNotFound` (a `LookupError`)."""
        return self.store.get_schedule(name)

    def pause_schedule(self, name: str) -> Schedule:
        """Stop firing a schedule (every worker, at once) until `resume_schedule`."""
        return self.store.pause_schedule(name, True)

    def resume_schedule(self, name: str) -> Schedule:
        """Fire a paused schedule again, from its first tick after now (the ticks that
        passed while it was paused are skipped)."""
        resumed = self.store.pause_schedule(name, False)
        self.wake_workers()
        return resumed

    def trigger_schedule(self, name: str) -> str:
        """Start the schedule's run now, once, besides its ticks; returns the run id."""
        run_id = self.store.trigger_schedule(name)
        self.wake_workers()
        return run_id

    # -- async twins ------------------------------------------------------------------

    async def schedule_async(
        self, name: str, fn: Fn | str, args: dict[str, Any] | None = None, **kw: Any
    ) -> Schedule:
        return await anyio.to_thread.run_sync(partial(self.schedule, name, fn, args, **kw))

    async def unschedule_async(self, name: str) -> bool:
        return await anyio.to_thread.run_sync(self.unschedule, name)

    async def schedules_async(self) -> list[Schedule]:
        return await anyio.to_thread.run_sync(self.schedules)

    async def get_schedule_async(self, name: str) -> Schedule:
        return await anyio.to_thread.run_sync(self.get_schedule, name)

    async def pause_schedule_async(self, name: str) -> Schedule:
        return await anyio.to_thread.run_sync(self.pause_schedule, name)

    async def resume_schedule_async(self, name: str) -> Schedule:
        return await anyio.to_thread.run_sync(self.resume_schedule, name)

    async def trigger_schedule_async(self, name: str) -> str:
        return await anyio.to_thread.run_sync(self.trigger_schedule, name)
