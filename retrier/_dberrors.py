"""Database failures as `TiersError`s: one short line each, never a password.

The dialects' transactions (`read`, `write`) and the command line pass driver errors
through `translate`, so a caller sees `DatabaseUnavailable`, `DatabaseBusy` or
`SchemaMissing` instead of a SQLAlchemy traceback, on either backend.
"""

from __future__ import annotations

import sqlite3
from typing import NoReturn

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from ._errors import DatabaseBusy, DatabaseUnavailable, SchemaMissing, TiersError

DRIVER_ERRORS = (OperationalError, ProgrammingError, sqlite3.OperationalError)
"""What `translate` understands: SQLAlchemy's wrappers, and SQLite's own error as a
BEGIN raises it (from a connection event, which SQLAlchemy does not wrap)."""

_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout elapsed
_UNDEFINED_TABLE = "42P01"  # PostgreSQL: relation does not exist
_ROLLED_BACK = "40"  # PostgreSQL: a deadlock or serialization failure; try again


def safe_url(url: URL) -> str:
    """`url` as text with its password masked (in the query string too)."""
    if "password" in url.query:
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def redact(url: str) -> str:
    """A URL that could not be parsed, with everything before its last '@' after the
    scheme (where a user and password would be) masked."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, sep, _ = head.partition("://")
    return f"{scheme}{sep}***@{tail}" if sep else f"***@{tail}"


def translate(exc: BaseException, url: URL | None = None) -> TiersError | None:
    """The `TiersError` a driver error stands for, or None if it is not about the
    database being unavailable, locked or without our tables (a bug: let it through)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    text = _one_line(str(orig), url)
    where = f" {safe_url(url)}" if url is not None else ""
    sqlstate = getattr(orig, "sqlstate", None)
    is_sqlite = isinstance(orig, sqlite3.OperationalError)
    busy = sqlstate == _LOCK_NOT_AVAILABLE or str(sqlstate).startswith(_ROLLED_BACK)
    if busy or (is_sqlite and "locked" in text):
        return DatabaseBusy(
            f"the database{where} stayed locked by other transactions past the wait "
            f"allowed ({text}); nothing was written, so the call may be retried"
        )
    if sqlstate == _UNDEFINED_TABLE or (is_sqlite and text.startswith("no such table")):
        return SchemaMissing(
            f"the database{where} has no durable-tiers tables ({text}); a Retrier creates "
            f"the engine's when it opens the database, a WorkflowManager its own"
        )
    connecting = isinstance(exc, DBAPIError) and exc.statement is None
    if is_sqlite or isinstance(exc, OperationalError) or connecting:
        return DatabaseUnavailable(f"cannot use the database{where}: {text}")
    return None


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc`, or the driver error a translated one was raised from, says the
    connection died under the call: a second try, on a new connection, may succeed."""
    return any(
        isinstance(error, DBAPIError) and error.connection_invalidated
        for error in (exc, exc.__cause__)
    )


def raise_translated(exc: BaseException, url: URL | None = None) -> NoReturn:
    """Raise `translate(exc)` (from `exc`), or `exc` itself if it has no translation."""
    error = translate(exc, url)
    if error is None:
        raise exc
    raise error from exc


def _one_line(text: str, url: URL | None) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    if url is not None:
        for secret in (url.password, url.query.get("password")):
            if isinstance(secret, str) and secret:
                line = line.replace(secret, "***")
    return line
