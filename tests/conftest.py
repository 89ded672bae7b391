"""Fixtures: every acceptance test runs against SQLite and PostgreSQL.

PostgreSQL tests use a fresh schema each. Locally they skip with a notice when no
server answers; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from retrier import Retrier

PG_BASE = os.environ.get("TIERS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(_libpq(PG_BASE), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


_PG_PROBLEM = _pg_available()


@pytest.fixture(scope="session")
def pg_problem() -> str | None:
    return _PG_PROBLEM


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tiers.db'}"
        return
    if _PG_PROBLEM is not None:
        if IN_CI:
            pytest.fail(f"CI=true but PostgreSQL is unreachable: {_PG_PROBLEM}")
        pytest.skip(f"PostgreSQL unreachable ({_PG_PROBLEM}); set up a server to run these")
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(PG_BASE), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_libpq(PG_BASE), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def make_retrier(db_url: str) -> Iterator[Callable[..., Retrier]]:
    """Build Retriers on the test database; at teardown, assert none leaked a connection."""
    made: list[Retrier] = []

    def make(**options: Any) -> Retrier:
        options.setdefault("lease", __import__("datetime").timedelta(seconds=5))
        retrier = Retrier(db_url, **options)
        made.append(retrier)
        return retrier

    yield make
    for retrier in made:
        checked_out = retrier.store.checked_out()
        retrier.close()
        assert checked_out == 0, f"{checked_out} database connection(s) left checked out"


@pytest.fixture
def retrier(make_retrier: Callable[..., Retrier]) -> Retrier:
    return make_retrier()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
