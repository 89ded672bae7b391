"""The retrier's pages: overview, runs, a run, workers; and logging in."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._errors import RunNotFound
from .._models import PENDING, RUNNING
from ._charts import activity_chart, timeline
from ._core import Dashboard
from ._queries import STATE_FILTERS, Queries
from ._security import csrf_ok

RETRIER_QUEUE = "(retrier)"  # how the retrier's own queue, '', is named in the filter


def routes(dash: Dashboard) -> list[Route]:
    queries = Queries(dash.store)

    async def overview(request: Request) -> Response:
        now = dash.store.clock.now_ms()
        data = await dash.call(queries.overview, now, dash.hidden_fn_prefixes)
        workers = await dash.call(queries.workers)
        return await dash.page(
            request,
            "overview.html",
            overview=data,
            chart=activity_chart(data.minutes),
            oldest_age_ms=None if data.oldest_due_ms is None else now - data.oldest_due_ms,
            workers=workers,
        )

    async def run_list(request: Request) -> Response:
        q = request.query_params
        state = q.get("state") or None
        if state is not None and state not in STATE_FILTERS:
            raise HTTPException(400, f"no state filter {state!r}")
        queue = q.get("queue") or None
        internal = q.get("internal") == "1"
        before = q.get("before")
        rows = await dash.call(
            lambda: queries.runs(
                state=state,
                fn=q.get("fn") or None,
                queue="" if queue == RETRIER_QUEUE else queue,
                hidden_prefixes=() if internal else dash.hidden_fn_prefixes,
                before_ms=int(before) if before and before.isdigit() else None,
                limit=100,
            )
        )
        queues = await dash.call(dash.store.list_queues)
        return await dash.page(
            request,
            "runs.html",
            rows=rows,
            filters={"state": state or "", "fn": q.get("fn", ""), "queue": queue or "",
                     "internal": internal},
            states=list(STATE_FILTERS),
            queues=[RETRIER_QUEUE, *(limits.name for limits in queues)],
            query=request.url.query,
        )

    async def run_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            row = await dash.call(dash.store.get, run_id)
        except RunNotFound:
            raise HTTPException(404, f"no run {run_id}") from None
        attempts = await dash.call(dash.store.attempts, run_id)
        why = None if row.state == "completed" else await dash.call(dash.store.explain, run_id)
        now = dash.store.clock.now_ms()
        spans: list[tuple[str, int, int | None, str]] = [
            (f"#{a.number} {a.outcome}", a.started_ms, a.finished_ms, a.outcome)
            for a in attempts
        ]
        if row.state == RUNNING and row.started_ms is not None:
            spans.append((f"#{row.attempts} running", row.started_ms, None, "running"))
        return await dash.page(
            request,
            "run.html",
            run=row,
            why=why,
            attempts=attempts,
            chart=timeline(spans, now),
            links=dash.run_links(row),
            can_cancel=row.state in (PENDING, RUNNING) and not row.cancel_requested,
            can_retry=row.state == "completed" and row.outcome == "failed" and row.owner is None,
        )

    async def cancel(request: Request) -> Response:
        run_id = request.path_params["run_id"]

        def work(_: FormData) -> str:
            changed = dash.store.cancel(run_id)
            return "canceled" if changed else "already finished; nothing to cancel"

        return await dash.act(request, f"/runs/{run_id}", work)

    async def retry(request: Request) -> Response:
        run_id = request.path_params["run_id"]

        def work(_: FormData) -> str:
            dash.store.retry(run_id)
            return "pending again, due now"

        return await dash.act(request, f"/runs/{run_id}", work)

    async def workers(request: Request) -> Response:
        rows = await dash.call(queries.workers)
        return await dash.page(request, "workers.html", workers=rows)

    async def login(request: Request) -> Response:
        if not dash.security.uses_login:
            raise HTTPException(404, "this dashboard has no login (read-only, or mounted)")
        next_path = _safe_next(request.query_params.get("next", "/"))
        if request.method == "GET":
            return await dash.page(request, "login.html", next_path=next_path)
        form = await request.form()
        if not csrf_ok(request, form):
            raise HTTPException(403, "CSRF check failed: reload the page and try again")
        if not dash.security.token_matches(_text(form, "token")):
            return await dash.page(
                request, "login.html", next_path=next_path, status_code=403,
                error="wrong token",
            )
        response = dash.redirect(request, _safe_next(_text(form, "next")), "logged in")
        dash.security.log_in(request, response)
        return response

    async def logout(request: Request) -> Response:
        form = await request.form()
        if not csrf_ok(request, form):
            raise HTTPException(403, "CSRF check failed: reload the page and try again")
        response = dash.redirect(request, "/", "logged out")
        dash.security.log_out(request, response)
        return response

    return [
        Route("/", overview, name="overview"),
        Route("/runs", run_list, name="runs"),
        Route("/runs/{run_id}", run_page, name="run"),
        Route("/runs/{run_id}/cancel", cancel, methods=["POST"]),
        Route("/runs/{run_id}/retry", retry, methods=["POST"]),
        Route("/workers", workers, name="workers"),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]


def _text(form: FormData, name: str) -> str:
    value: Any = form.get(name, "")
    return value if isinstance(value, str) else ""


def _safe_next(path: str) -> str:
    """A path inside the dashboard to go back to (never another site)."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
