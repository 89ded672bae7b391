"""Opening the dialect for a database URL; the contract itself is in `_dialect`.

Everything else in the store is plain SQLAlchemy Core shared by both backends.
"""

from __future__ import annotations

import os
import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ._dberrors import redact, safe_url
from ._dialect import (
    CANCEL,
    WAKE,
    Dialect,
    Durability,
    Listener,
    WouldBlock,
    is_transient,
    partial_index,
    reconnecting,
    sent_at,
    stamped,
)
from ._errors import DatabaseUnavailable, InvalidDatabaseURL, InvalidSettings
from ._postgres import PostgresDialect
from ._sqlite import SQLiteDialect

__all__ = [
    "CANCEL",
    "WAKE",
    "Dialect",
    "Durability",
    "Listener",
    "PostgresDialect",
    "SQLiteDialect",
    "WouldBlock",
    "is_transient",
    "open_dialect",
    "partial_index",
    "reconnecting",
    "sent_at",
    "stamped",
]

# A namespace becomes a PostgreSQL schema name and part of channel names.
_NAMESPACE = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def open_dialect(
    url: str,
    namespace: str | None = None,
    *,
    create: bool = True,
    durability: Durability = "normal",
) -> Dialect:
    """The dialect for a database URL, with its engine configured (no connection yet).

    `namespace` keeps this app's tables and notifications apart from any other app's
    in the same PostgreSQL database (a schema of that name, channels of their own).
    With `create=False` (the command line, which only looks), a SQLite file that does
    not exist raises `DatabaseUnavailable` instead of being created. Errors never show
    the URL's password.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        reason = str(exc).replace(url, redact(url))
        raise InvalidDatabaseURL(
            f"cannot parse database URL {redact(url)!r}: {reason}"
        ) from None
    backend = parsed.get_backend_name()
    if durability not in ("full", "normal"):
        raise InvalidSettings(f"durability is 'full' or 'normal', got {durability!r}")
    if namespace is not None and not _NAMESPACE.fullmatch(namespace):
        raise InvalidSettings(
            f"a namespace is 1 to 40 lowercase letters, digits or _, not starting with a "
            f"digit; got {namespace!r}"
        )
    if backend == "sqlite":
        if namespace is not None:
            raise InvalidSettings(
                "namespaces are for PostgreSQL; on SQLite, give each app its own database "
                "file (sqlite:///billing.db, sqlite:///mail.db)"
            )
        path = parsed.database
        if not create and path and path != ":memory:" and not os.path.exists(path):
            raise DatabaseUnavailable(f"no such database: the SQLite file {path!r} does not exist")
        return SQLiteDialect(parsed, durability)
    if backend == "postgresql":
        return PostgresDialect(parsed, namespace, durability)
    raise InvalidDatabaseURL(
        f"unsupported database {backend!r} in {safe_url(parsed)!r}: use "
        f"sqlite:///path/to/file.db or postgresql+psycopg://user@host/dbname"
    )
