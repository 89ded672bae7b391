"""`tiers schedules ...`: list, pause, resume, trigger and delete cron schedules
(loaded through the `tiers.cli` entry point, like the other tiers' groups)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from ._cli import Context, console, fail, or_exit, print_listing
from ._errors import ScheduleNotFound
from ._schedules import Schedule

_COLUMNS = ("name", "target", "function", "cron", "next_fire", "last_fire", "state")


@click.group()
def schedules() -> None:
    """Cron schedules: when each fires next, pausing, triggering, deleting."""


@schedules.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.pass_obj
def schedules_list(obj: Context, as_json: bool) -> None:
    """Every schedule with its next and last tick (in the schedule's time zone)."""
    rows = [_row(s, as_json) for s in obj.store().list_schedules()]
    columns = (*_COLUMNS, "timezone", "queue", "args", "missed", "last_run_id")
    print_listing(columns if as_json else _COLUMNS, rows, as_json, "schedule(s)")


@schedules.command("pause")
@click.argument("name")
@click.pass_obj
def schedules_pause(obj: Context, name: str) -> None:
    """Stop firing a schedule, on every worker, until it is resumed."""
    or_exit(obj.store().pause_schedule, name, True)
    console.print(f"schedule {name} paused")


@schedules.command("resume")
@click.argument("name")
@click.pass_obj
def schedules_resume(obj: Context, name: str) -> None:
    """Fire a paused schedule again, from its first tick after now."""
    resumed: Schedule = or_exit(obj.store().pause_schedule, name, False)
    console.print(f"schedule {name} resumed; next tick {_when(resumed.next_fire)}")


@schedules.command("trigger")
@click.argument("name")
@click.pass_obj
def schedules_trigger(obj: Context, name: str) -> None:
    """Start the schedule's run now, once, besides its ticks."""
    run_id = or_exit(obj.store().trigger_schedule, name)
    console.print(f"run {run_id} started")


@schedules.command("delete")
@click.argument("name")
@click.pass_obj
def schedules_delete(obj: Context, name: str) -> None:
    """Delete a schedule (one removed from the code); the runs it started stay."""
    if not obj.store().delete_schedule(name):
        fail(ScheduleNotFound(name))
    console.print(f"schedule {name} deleted")


def _row(s: Schedule, as_json: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": s.name,
        "target": f"{s.target}:{s.queue}" if s.queue and not as_json else s.target,
        "function": s.fn,
        "cron": s.cron,
        "next_fire": _iso(s.next_fire) if as_json else _when(s.next_fire),
        "last_fire": _iso(s.last_fire) if as_json else _when(s.last_fire),
        "state": "paused" if s.paused else "active",
    }
    if as_json:
        row.update(
            timezone=s.timezone, queue=s.queue, args=s.args, missed=s.missed,
            last_run_id=s.last_run_id,
        )
    return row


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _when(when: datetime | None) -> str:
    return "never" if when is None else when.strftime("%m-%d %H:%M:%S %Z")

