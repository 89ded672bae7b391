"""`tiers workflows ...`: list, show, watch, cancel, restart, retrigger, check, send
events, cleanup.

Loaded by `retrier._cli` through the `tiers.cli` entry-point group. Reading needs only
a database (`--db`); cancel, restart, retrigger and check need the app
(`--app module:workflows`), whose definitions and handlers they use.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import anyio
import click
from rich.table import Table

from retrier.engine import (
    CliContext,
    console,
    format_ms,
    or_exit,
    print_listing,
    print_why,
    shorten,
)

from ._explain import explain_workflow
from ._journal import Journal
from ._manager import WorkflowManager
from ._retention import purge_events, purge_workflows
from ._watch import watch_workflow


def _journal(obj: CliContext) -> Journal:
    return Journal(obj.store())


def _manager(obj: CliContext) -> WorkflowManager:
    app = obj.app()
    if not isinstance(app, WorkflowManager):
        raise click.BadParameter("--app must name a WorkflowManager for this command")
    return app


@click.group()
def workflows() -> None:
    """Inspect and manage workflows."""


@workflows.command("list")
@click.option("--state", type=click.Choice(["running", "completed", "failed", "canceled"]))
@click.option("--name", help="Only workflows of this name.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.pass_obj
def list_(obj: CliContext, state: str | None, name: str | None, limit: int, as_json: bool) -> None:
    """The most recent workflows, newest first."""
    rows = [
        {
            "id": r.id, "name": r.name, "state": r.state, "created": r.created_ms,
            "finished": r.finished_ms, "error": r.error,
        }
        for r in _journal(obj).list(state=state, name=name, limit=limit)
    ]
    columns = ("id", "name", "state", "created", "finished", "error")
    print_listing(columns, rows, as_json, "workflow(s)")


@workflows.command("show")
@click.argument("workflow_id")
@click.pass_obj
def show(obj: CliContext, workflow_id: str) -> None:
    """One workflow with its journal: each step, attempts, results, errors, times."""
    journal = _journal(obj)
    row = or_exit(journal.get, workflow_id)
    info = Table(show_header=False)
    for name, value in [
        ("id", row.id),
        ("name", row.name),
        ("state", row.state),
        ("pool", row.pool),
        ("args", json.dumps(row.args)),
        ("result", _json(row.result)),
        ("error", row.error or ""),
        ("idempotency key", row.key or ""),
        ("parent", row.parent_id or ""),
        ("retrigger of", row.retrigger_of or ""),
        ("on_complete", row.on_complete or ""),
        ("progress", _json(row.progress)),
        ("created", format_ms(row.created_ms)),
        ("deadline", format_ms(row.deadline_ms)),
        ("finished", format_ms(row.finished_ms)),
    ]:
        info.add_row(name, value)
    console.print(info)
    steps = Table(
        "step",
        "kind",
        "state",
        "attempts",
        "started",
        "finished",
        "result / error",
        title="journal",
    )
    for s in journal.steps(workflow_id):
        detail = s["error"] or _json(s["result"])
        if s["kind"] in ("sleep", "event") and s["state"] == "waiting" and s["wake_ms"]:
            detail = f"until {format_ms(s['wake_ms'])}"
        if s["kind"] == "invoke":
            detail = f"child {s['child_id']} {detail}".strip()
        steps.add_row(
            s["name"],
            s["kind"],
            s["state"],
            str(s["attempts"]),
            format_ms(s["started_ms"]),
            format_ms(s["finished_ms"]),
            shorten(detail, 80),
        )
    console.print(steps)
    lines = journal.progress.logs(workflow_id, limit=_SHOWN_LOGS)
    if lines:
        table = Table("#", "at", "level", "after", "message", title="log")
        for line in lines:
            table.add_row(
                str(line.seq), format_ms(int(line.at.timestamp() * 1000)), line.level,
                line.step or "", shorten(line.message, 120),
            )
        console.print(table)


@workflows.command("watch")
@click.argument("workflow_id")
@click.pass_obj
def watch(obj: CliContext, workflow_id: str) -> None:
    """Print a workflow's changes as they happen (one JSON object a line) until it ends."""
    journal = _journal(obj)
    or_exit(journal.get, workflow_id)

    async def follow() -> None:
        async for event in watch_workflow(journal, workflow_id):
            click.echo(json.dumps(event.to_json(), default=str))

    anyio.run(follow)


@workflows.command("cleanup")
@click.option("--older-than", type=float, default=7.0, show_default=True,
              help="Days since the workflows finished (and the events were sent).")
@click.pass_obj
def cleanup(obj: CliContext, older_than: float) -> None:
    """Delete finished workflows (journals, log lines, large results) and events older
    than --older-than days: what the workers' daily retention job does."""
    journal = _journal(obj)
    older_than_ms = int(older_than * 86_400_000)
    gone = or_exit(purge_workflows, journal, older_than_ms)
    events = or_exit(purge_events, journal, older_than_ms)
    console.print(
        f"deleted {gone} workflow(s) and {events} event(s) older than {older_than:g} day(s)"
    )


@workflows.command("why")
@click.argument("workflow_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def why(obj: CliContext, workflow_id: str, as_json: bool) -> None:
    """Why a workflow is not done: what it sleeps or waits for, or what holds its step."""
    print_why(or_exit(explain_workflow, _journal(obj), workflow_id), as_json)


@workflows.command("cancel")
@click.argument("workflow_id")
@click.pass_obj
def cancel(obj: CliContext, workflow_id: str) -> None:
    """Cancel a running workflow (needs --app)."""
    manager = _manager(obj)
    or_exit(manager.cancel, workflow_id)
    console.print(f"{workflow_id}: {or_exit(manager.status, workflow_id)}")


@workflows.command("retrigger")
@click.argument("workflow_id")
@click.pass_obj
def retrigger(obj: CliContext, workflow_id: str) -> None:
    """Start a fresh run of a workflow with the same input (needs --app)."""
    new_id = or_exit(_manager(obj).retrigger, workflow_id)
    console.print(f"started {new_id}")


@workflows.command("restart")
@click.argument("workflow_id")
@click.option("--from", "from_step", required=True, help="The step to run again (and all after).")
@click.pass_obj
def restart(obj: CliContext, workflow_id: str, from_step: str) -> None:
    """Run a finished workflow again from a journaled step (needs --app)."""
    manager = _manager(obj)
    or_exit(manager.restart, workflow_id, from_step)
    console.print(f"{workflow_id}: restarted from {from_step}")


@workflows.command("check")
@click.option("--limit", type=int, default=None, help="Check at most this many (oldest first).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def check(obj: CliContext, limit: int | None, as_json: bool) -> None:
    """Replay every unfinished workflow against the code of --app, running nothing.

    Lists the workflows that would diverge from their journal (step, expected,
    found), fail, or are not defined; exits 1 if there is any, so a deploy can be
    gated on it.
    """
    report = _manager(obj).check(limit=limit)
    if as_json:
        click.echo(json.dumps({
            "checked": report.checked,
            "problems": [dataclasses.asdict(p) for p in report.problems],
        }))
    else:
        table = Table("workflow", "id", "problem", "step", "expected", "found", title="check")
        for p in report.problems:
            found = p.found if p.kind == "diverged" else shorten(p.detail, 80)
            table.add_row(p.workflow, p.workflow_id, p.kind, p.step or "", p.expected, found)
        if report.problems:
            console.print(table)
        console.print(
            f"{report.checked} unfinished workflow(s) checked, {len(report.problems)} problem(s)"
        )
    if report.problems:
        raise SystemExit(1)


@workflows.command("send-event")
@click.argument("name")
@click.argument("data", default="{}")
@click.pass_obj
def send_event(obj: CliContext, name: str, data: str) -> None:
    """Send event NAME with DATA (a JSON object) to waiting workflows."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"DATA is not JSON: {exc}") from None
    from ._context import _check_event

    or_exit(_check_event, name, payload)
    journal = _journal(obj)
    if obj._app:
        event_id = or_exit(_manager(obj).send_event, name, payload)
    else:
        event_id = journal.events.send_event_alone(name, payload)
    console.print(f"sent event {event_id}")


_SHOWN_LOGS = 200


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value)
