"""The workpool's dashboard pages: every pool with its limits and load; one pool, with
its cap to change, pause and resume, and its pool group (the members' guarantees and
load, the group's cap to change). Loaded through the `tiers.dashboard` entry point
(needs the `dashboard` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from retrier import InvalidSettings
from retrier.dashboard import Dashboard, Section
from retrier.engine import PENDING, RUNNING

from ._admin import set_cap, set_group_cap, stored_pool
from ._errors import PoolNotFound

_HOUR_MS = 3_600_000


def section(dash: Dashboard) -> Section:
    store = dash.store

    def load_all() -> list[dict[str, Any]]:
        since = store.clock.now_ms() - _HOUR_MS
        return [
            {"limits": limits, "counts": store.queue_counts(limits.name, since)}
            for limits in store.list_queues()
        ]

    def load_one(name: str) -> dict[str, Any]:
        limits = stored_pool(store, name)
        return {
            "limits": limits,
            "counts": store.queue_counts(name, store.clock.now_ms() - _HOUR_MS),
            "running": store.list_runs(state=RUNNING, queue=name, limit=50),
            "pending": store.list_runs(state=PENDING, queue=name, limit=20),
            "key_limits": list(store.key_limits(name).items())[:100],
            "group": store.get_group(limits.group_name) if limits.group_name else None,
        }

    async def pool_list(request: Request) -> Response:
        return await dash.page(request, "pools/list.html", pools=await dash.call(load_all))

    async def pool_page(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            data = await dash.call(load_one, name)
        except PoolNotFound:
            raise HTTPException(404, f"no pool {name}") from None
        return await dash.page(request, "pools/show.html", name=name, **data)

    def change(name: str, cap: int | None) -> Any:
        def work(form: FormData) -> str:
            value = cap if cap is not None else _int(form.get("max_parallelism"))
            limits = set_cap(store, name, value)
            return "paused" if limits.max_parallelism == 0 else f"cap set to {value}"

        return work

    async def set_cap_action(request: Request) -> Response:
        name = request.path_params["name"]
        return await dash.act(request, f"/pools/{name}", change(name, None))

    async def set_group_cap_action(request: Request) -> Response:
        name = request.path_params["name"]

        def work(form: FormData) -> str:
            limits = stored_pool(store, name)
            if limits.group_name is None:
                raise InvalidSettings(f"pool {name!r} belongs to no group")
            group = set_group_cap(store, limits.group_name, _int(form.get("max_parallelism")))
            return f"group {group.name} cap set to {group.max_parallelism}"

        return await dash.act(request, f"/pools/{name}", work)

    async def pause(request: Request) -> Response:
        name = request.path_params["name"]
        return await dash.act(request, f"/pools/{name}", change(name, 0))

    return Section(
        name="pools",
        nav=[("Pools", "/pools")],
        routes=[
            Route("/pools", pool_list),
            Route("/pools/{name:path}/cap", set_cap_action, methods=["POST"]),
            Route("/pools/{name:path}/pause", pause, methods=["POST"]),
            Route("/pools/{name:path}/group-cap", set_group_cap_action, methods=["POST"]),
            Route("/pools/{name:path}", pool_page),
        ],
        templates=Path(__file__).parent / "templates",
    )


def _int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise InvalidSettings(f"the cap must be a whole number, got {value!r}") from None
