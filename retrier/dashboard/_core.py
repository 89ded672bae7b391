"""`Dashboard`: what every page handler needs, the retrier's and the tiers' alike:
the store, rendering a page (or just its live part), and acting safely."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import anyio.to_thread
import jinja2
from sqlalchemy.engine import make_url
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from .._errors import TiersError
from .._store import Store
from ._format import FILTERS
from ._sections import Section
from ._security import CSRF_FIELD, Security, cookie_path, csrf_ok, csrf_token, set_csrf_cookie

T = TypeVar("T")

TEMPLATES = Path(__file__).parent / "templates"
LIVE_HEADER = "x-tiers-live"
FLASH_COOKIE = "tiers_flash"


class Dashboard:
    """One dashboard over one store. Tiers get it to build their `Section`."""

    def __init__(self, store: Store, security: Security, *, title: str = "durable-tiers") -> None:
        self.store = store
        self.security = security
        self.read_only = security.read_only
        self.title = title
        self.sections: list[Section] = []
        url = make_url(store.url)
        self.database = url.render_as_string(hide_password=True)
        self._secrets = [s for s in (url.password, store.url) if s]
        self._env = self._environment([])

    def add_sections(self, sections: Sequence[Section]) -> None:
        self.sections.extend(sections)
        self._env = self._environment([s.templates for s in self.sections if s.templates])

    @staticmethod
    def _environment(dirs: list[Path]) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([TEMPLATES, *dirs]),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters.update(FILTERS)
        return env

    # -- what sections read --------------------------------------------------------

    @property
    def hidden_fn_prefixes(self) -> tuple[str, ...]:
        return tuple(p for s in self.sections for p in s.hidden_fn_prefixes)

    def run_links(self, run: Any) -> list[tuple[str, str]]:
        return [link for s in self.sections if s.run_links for link in s.run_links(run)]

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call off the event loop."""
        return await anyio.to_thread.run_sync(partial(fn, *args))

    def redact(self, text: str) -> str:
        """`text` without the database URL or its password."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- pages ---------------------------------------------------------------------

    async def page(
        self, request: Request, template: str, *, status_code: int = 200, **context: Any
    ) -> Response:
        """Render `template` (the whole page, or only its `live` block when the page's
        script polls for it)."""
        live = request.headers.get(LIVE_HEADER) == "1"
        csrf, new_csrf = csrf_token(request)
        flash = None if live else _read_flash(request)
        values = {
            "request": request,
            "base": request.scope.get("root_path") or "",
            "title": self.title,
            "database": self.database,
            "nav": self._nav(),
            "read_only": self.read_only,
            "can_act": await self.security.allowed(request),
            "uses_login": self.security.uses_login,
            "csrf": csrf,
            "csrf_field": CSRF_FIELD,
            "flash": flash,
            "now_ms": self.store.clock.now_ms(),
            **context,
        }
        tmpl = self._env.get_template(template)
        if live:
            html = "".join(tmpl.blocks["live"](tmpl.new_context(values)))
        else:
            html = tmpl.render(values)
        response = HTMLResponse(html, status_code=status_code)
        if new_csrf:
            set_csrf_cookie(request, response, csrf)
        if flash is not None:
            response.delete_cookie(FLASH_COOKIE, path=cookie_path(request))
        return response

    def _nav(self) -> list[tuple[str, str]]:
        own = [("Overview", "/"), ("Runs", "/runs"), ("Workers", "/workers")]
        return own + [entry for s in self.sections for entry in s.nav]

    # -- actions -------------------------------------------------------------------

    async def form(self, request: Request) -> FormData:
        """The posted form of an action, once the request may act: 403 when read-only,
        without a valid CSRF token, or not authenticated."""
        if self.read_only:
            raise HTTPException(403, "the dashboard is read-only")
        form = await request.form()
        if not csrf_ok(request, form):
            raise HTTPException(403, "CSRF check failed: reload the page and try again")
        if not await self.security.allowed(request):
            raise HTTPException(403, "not authorized to act: log in first")
        return form

    async def act(
        self, request: Request, back: str, work: Callable[[FormData], str]
    ) -> Response:
        """Check the request (`form`), run `work(form)` (blocking; it returns what to
        tell the user), and go back to `back` with its message or its error."""
        form = await self.form(request)
        try:
            message = await self.call(work, form)
        except (TiersError, ValueError) as exc:
            return self.redirect(request, back, self.redact(str(exc)), error=True)
        return self.redirect(request, back, message)

    def redirect(
        self, request: Request, path: str, message: str | None = None, *, error: bool = False
    ) -> Response:
        base = request.scope.get("root_path") or ""
        response = RedirectResponse(base + path, status_code=303)
        if message:
            value = quote(("error:" if error else "ok:") + message[:300])
            response.set_cookie(
                FLASH_COOKIE, value, path=cookie_path(request), httponly=True, samesite="strict"
            )
        return response


def _read_flash(request: Request) -> dict[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    kind, _, text = unquote(raw).partition(":")
    return {"kind": "error" if kind == "error" else "ok", "text": text}
