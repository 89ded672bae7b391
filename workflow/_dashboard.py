"""The workflow tier's dashboard pages: workflows, and one workflow with its journal as
a timeline, its progress and log lines, what it waits for, cancel, restart from a step
and send an event; and `/workflows/{id}/watch`, its changes as Server-Sent Events for a
web frontend. Loaded through the `tiers.dashboard` entry point (needs the `dashboard`
extra)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from retrier.dashboard import Dashboard, Section, short_id, timeline

from ._admin import cancel_stored, restart_stored, send_event_stored
from ._errors import InvalidEvent, WorkflowNotFound
from ._journal import Journal
from ._models import EVENT, INVOKE, PATCH, RUNNING, SLEEP, WAITING
from ._watch import watch_workflow

STATES = ("running", "completed", "failed", "canceled")
DRIVER_PREFIX = "tiers.workflow.drive:"


def section(dash: Dashboard) -> Section:
    store = dash.store
    journal = Journal(store)

    def load_one(workflow_id: str) -> dict[str, Any]:
        row = journal.get(workflow_id)
        steps = [dict(s) for s in journal.steps(workflow_id)]
        waits = [_waiting_for(s) for s in steps if s["state"] == WAITING]
        logs = journal.progress.logs(workflow_id, limit=_PAGE_LOGS)
        restartable = [s["name"] for s in steps if s["kind"] != PATCH]
        return {
            "wf": row, "steps": steps, "waits": waits, "logs": logs, "restartable": restartable
        }

    async def workflow_list(request: Request) -> Response:
        q = request.query_params
        state = q.get("state") or None
        if state is not None and state not in STATES:
            raise HTTPException(400, f"no workflow state {state!r}")
        name = q.get("name") or None
        rows = await dash.call(lambda: journal.list(state=state, name=name, limit=100))
        return await dash.page(
            request, "workflows/list.html", rows=rows, states=STATES,
            filters={"state": state or "", "name": name or ""},
        )

    async def workflow_page(request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        try:
            data = await dash.call(load_one, workflow_id)
        except WorkflowNotFound:
            raise HTTPException(404, f"no workflow {workflow_id}") from None
        now = store.clock.now_ms()
        spans = [
            (f"{s['name']} ({s['kind']})", s["started_ms"], _end(s), _css(s))
            for s in data["steps"]
        ]
        event = next((w for w in data["waits"] if w["kind"] == EVENT), None)
        return await dash.page(
            request, "workflows/show.html", chart=timeline(spans, now), event=event, **data
        )

    async def watch(request: Request) -> Response:
        """The workflow's changes as Server-Sent Events (`event: status|step|log|
        progress`, `data:` the event's JSON), ending with `event: end` once it ends."""
        workflow_id = request.path_params["workflow_id"]
        try:
            await dash.call(journal.get, workflow_id)
        except WorkflowNotFound:
            raise HTTPException(404, f"no workflow {workflow_id}") from None
        return StreamingResponse(
            _sse(journal, workflow_id),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def cancel(request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]

        def work(_: FormData) -> str:
            return "canceled" if cancel_stored(store, workflow_id) else "already over"

        return await dash.act(request, f"/workflows/{workflow_id}", work)

    async def restart(request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]

        def work(form: FormData) -> str:
            step = str(form.get("step", "")).strip()
            done = restart_stored(store, workflow_id, step)
            return f"restarted from {step} ({len(done.deleted)} journal entries to run again)"

        return await dash.act(request, f"/workflows/{workflow_id}", work)

    def send(form: FormData) -> str:
        name = str(form.get("name", "")).strip()
        raw = str(form.get("data", "") or "{}")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidEvent(f"the event's data is not JSON: {exc}") from None
        event_id = send_event_stored(store, name, data)
        return f"sent event {name!r} (#{event_id})"

    async def send_to(request: Request) -> Response:
        return await dash.act(request, f"/workflows/{request.path_params['workflow_id']}", send)

    async def send_any(request: Request) -> Response:
        return await dash.act(request, "/workflows", send)

    def run_links(run: Any) -> list[tuple[str, str]]:
        if run.owner is None:
            return []
        return [(f"workflow {short_id(run.owner)}", f"/workflows/{run.owner}")]

    return Section(
        name="workflows",
        nav=[("Workflows", "/workflows")],
        routes=[
            Route("/workflows", workflow_list),
            Route("/workflows/events", send_any, methods=["POST"]),
            Route("/workflows/{workflow_id}", workflow_page),
            Route("/workflows/{workflow_id}/watch", watch),
            Route("/workflows/{workflow_id}/cancel", cancel, methods=["POST"]),
            Route("/workflows/{workflow_id}/restart", restart, methods=["POST"]),
            Route("/workflows/{workflow_id}/events", send_to, methods=["POST"]),
        ],
        templates=Path(__file__).parent / "templates",
        hidden_fn_prefixes=(DRIVER_PREFIX,),
        run_links=run_links,
    )


_PAGE_LOGS = 500  # log lines on a workflow's page


async def _sse(journal: Journal, workflow_id: str) -> AsyncIterator[str]:
    events = watch_workflow(journal, workflow_id)
    try:
        async for event in events:
            data = json.dumps(event.to_json(), default=str)
            yield f"event: {event.kind}\ndata: {data}\n\n"
        yield "event: end\ndata: {}\n\n"
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def _end(step: dict[str, Any]) -> int | None:
    if step["finished_ms"] is not None:
        return int(step["finished_ms"])
    return None


def _css(step: dict[str, Any]) -> str:
    return "waiting" if step["state"] in (WAITING, RUNNING) else str(step["state"])


def _waiting_for(step: dict[str, Any]) -> dict[str, Any]:
    """What a waiting journal entry waits for, for the page."""
    kind = step["kind"]
    wait: dict[str, Any] = {"kind": kind, "name": step["name"], "until_ms": step["wake_ms"]}
    if kind == EVENT:
        wait["event"] = step["event_name"]
        wait["match"] = step["match"] or {}
    elif kind == INVOKE:
        wait["child"] = step["child_id"]
    elif kind == SLEEP:
        pass
    return wait
