"""Who may act, and proof that a form was posted by the dashboard's own page.

Acting (cancel, retry, change a cap, send an event) needs authentication: a token
(the CLI's `TIERS_DASHBOARD_TOKEN`), presented once on the login page, which sets a
session cookie, or as `Authorization: Bearer <token>`; or, when the app is mounted in
yours, your `authorize(request) -> bool`. With neither, nobody may act.

Every POST also carries a CSRF token: a random value in a cookie, repeated in a
hidden form field (double submit), compared on arrival.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

Authorize = Callable[[Request], "bool | Awaitable[bool]"]
"""Your check of a request that wants to act: True lets it."""

CSRF_COOKIE = "tiers_csrf"
CSRF_FIELD = "csrf"
SESSION_COOKIE = "tiers_session"


class Security:
    """The dashboard's rules for acting: read-only, token or authorize, CSRF."""

    def __init__(
        self, *, token: str | None, authorize: Authorize | None, read_only: bool
    ) -> None:
        if token is not None and authorize is not None:
            raise ValueError("give token= or authorize=, not both")
        if token is not None and len(token) < 8:
            raise ValueError("the dashboard token must have at least 8 characters")
        self.read_only = read_only
        self._token = token
        self._authorize = authorize

    @property
    def uses_login(self) -> bool:
        """Whether the dashboard has its own login page (token mode)."""
        return self._token is not None and not self.read_only

    @property
    def can_ever_act(self) -> bool:
        return not self.read_only and (self._token is not None or self._authorize is not None)

    async def allowed(self, request: Request) -> bool:
        """Whether this request may act (not whether its CSRF token is right)."""
        if not self.can_ever_act:
            return False
        if self._authorize is not None:
            verdict = self._authorize(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            return verdict is True
        assert self._token is not None
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and self.token_matches(header[7:].strip()):
            return True
        session = request.cookies.get(SESSION_COOKIE, "")
        return bool(session) and hmac.compare_digest(session, self._session_value())

    def token_matches(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(
            given.encode(), self._token.encode()
        )

    def _session_value(self) -> str:
        assert self._token is not None
        key = self._token.encode()
        return hmac.new(key, b"tiers-dashboard-session", hashlib.sha256).hexdigest()

    def log_in(self, request: Request, response: Response) -> None:
        _cookie(request, response, SESSION_COOKIE, self._session_value())

    @staticmethod
    def log_out(request: Request, response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path=cookie_path(request))


def csrf_token(request: Request) -> tuple[str, bool]:
    """The request's CSRF token, and whether it is new (and must be set as a cookie)."""
    current = request.cookies.get(CSRF_COOKIE, "")
    if len(current) >= 32:
        return current, False
    return secrets.token_urlsafe(32), True


def set_csrf_cookie(request: Request, response: Response, value: str) -> None:
    _cookie(request, response, CSRF_COOKIE, value)


def csrf_ok(request: Request, form: Any) -> bool:
    """The double-submit check: the form's field equals the cookie, and is not empty."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    field = form.get(CSRF_FIELD, "")
    return (
        isinstance(field, str)
        and len(cookie) >= 32
        and hmac.compare_digest(cookie.encode(), field.encode())
    )


def cookie_path(request: Request) -> str:
    return (request.scope.get("root_path") or "") + "/"


def _cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path=cookie_path(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
