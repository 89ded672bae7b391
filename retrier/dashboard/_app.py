"""`create_app`: the dashboard as an ASGI app, to serve (`tiers dashboard`) or mount."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._clock import SystemClock
from .._dialects import open_dialect
from .._errors import TiersError
from .._errors import describe as describe_error
from .._retrier import retrier_of
from .._store import Store
from . import _pages
from ._core import Dashboard
from ._sections import SectionFactory, installed_sections
from ._security import Authorize, Security

STATIC = Path(__file__).parent / "static"

# Scripts and styles from the dashboard itself only; no framing (clickjacking).
_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        b"img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def create_app(
    db: str | Any,
    *,
    token: str | None = None,
    authorize: Authorize | None = None,
    read_only: bool = False,
    title: str = "durable-tiers",
    sections: Sequence[SectionFactory] | None = None,
) -> Starlette:
    """The dashboard of a database, as a Starlette (ASGI) app.

    `db`: a database URL (the dashboard opens its own connections, and never creates
    a database or its tables), or a `Retrier`, `Workpool`, `WorkflowManager` or
    `Store` whose database to show. Acting needs `token` (a shared secret, entered
    once on the login page or sent as `Authorization: Bearer ...`) or `authorize`
    (your `authorize(request) -> bool`, sync or async, for an app mounted in yours);
    with neither, or with `read_only=True`, the dashboard only shows. `sections`: the
    tiers' pages (default: every `tiers.dashboard` entry point installed).
    """
    security = Security(token=token, authorize=authorize, read_only=read_only)
    store, owned = _store_of(db)
    dash = Dashboard(store, security, title=title)
    dash.add_sections([make(dash) for make in (installed_sections() if sections is None
                                                 else sections)])
    routes: list[BaseRoute] = [
        *_pages.routes(dash),
        *(route for section in dash.sections for route in section.routes),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if owned:
            store.dispose()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return await dash.page(
            request, "error.html", status_code=exc.status_code,
            message=dash.redact(str(exc.detail)),
        )

    async def tiers_error(request: Request, exc: Exception) -> Response:
        return await dash.page(
            request, "error.html", status_code=503, message=dash.redact(describe_error(exc))
        )

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, TiersError: tiers_error},
    )
    app.add_middleware(_SecurityHeaders)
    app.state.dashboard = dash
    return app


def _store_of(db: Any) -> tuple[Store, bool]:
    """The store to show, and whether the dashboard opened it (and must close it)."""
    if isinstance(db, Store):
        return db, False
    if isinstance(db, str):
        open_dialect(db, create=False).dispose()  # a missing SQLite file is an error
        return Store(db, SystemClock()), True
    try:
        return retrier_of(db).store, False
    except TypeError:
        raise TypeError(
            "create_app needs a database URL, or a Retrier, Workpool, WorkflowManager "
            f"or Store; got {type(db).__name__}"
        ) from None


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)
