"""The cron schedules' dashboard page: every schedule with its next and last tick, and
pausing, resuming and triggering one. Loaded through the `tiers.dashboard` entry point,
like a tier's pages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ._core import Dashboard
from ._sections import Section


def section(dash: Dashboard) -> Section:
    store = dash.store

    async def schedule_list(request: Request) -> Response:
        rows = await dash.call(store.list_schedules)
        return await dash.page(request, "schedules/list.html", schedules=rows)

    def action(verb: str) -> Callable[[Request], Awaitable[Response]]:
        async def act(request: Request) -> Response:
            name = request.path_params["name"]

            def work(_: FormData) -> str:
                if verb == "trigger":
                    return f"schedule {name}: run {store.trigger_schedule(name)} started"
                store.pause_schedule(name, verb == "pause")
                return f"schedule {name} {verb}d"

            return await dash.act(request, "/schedules", work)

        return act

    return Section(
        name="schedules",
        nav=[("Schedules", "/schedules")],
        routes=[
            Route("/schedules", schedule_list),
            *(
                Route(f"/schedules/{{name:path}}/{verb}", action(verb), methods=["POST"])
                for verb in ("pause", "resume", "trigger")
            ),
        ],
    )
