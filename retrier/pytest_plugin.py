"""pytest fixtures for testing an app built on durable-tiers; see docs/testing.md.

Installed with durable-tiers and loaded by pytest on its own (the `tiers` entry point
of the `pytest11` group); `-p no:tiers` turns it off. Every fixture is named
`tiers_*` and is function-scoped:

- `tiers_clock`: a `FakeClock`, shared by the Retriers `tiers_make_retrier` builds;
- `tiers_database_url`: a fresh, empty database per test: a SQLite file in `tmp_path`,
  or with `--tiers-database-url=postgresql+psycopg://...` (or the environment variable
  `TIERS_TEST_DATABASE_URL`) a schema of its own in that PostgreSQL database, dropped
  after the test;
- `tiers_make_retrier(**options)`: builds Retriers on that database and clock; after
  the test, closes them and fails the test if one left a connection checked out;
- `tiers_retrier`: `tiers_make_retrier()`;
- `tiers_drain(target=None)`: `retrier.testing.drain` of `target`, or of every Retrier
  `tiers_make_retrier` built in this test.

Loading the plugin imports the `retrier` package (about half a second, once per test
run, in an environment where durable-tiers is installed).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from ._clock import FakeClock
from ._retrier import Retrier
from .testing import Target, drain

ENV_DATABASE_URL = "TIERS_TEST_DATABASE_URL"
"""The environment variable naming a PostgreSQL database for `tiers_database_url`."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tiers", "durable-tiers testing mode")
    group.addoption(
        "--tiers-database-url",
        default=None,
        metavar="URL",
        help=(
            "a PostgreSQL database for the tiers_database_url fixture (each test gets a "
            f"schema of its own in it); default: ${ENV_DATABASE_URL}, else a SQLite file "
            "per test"
        ),
    )


@pytest.fixture
def tiers_clock() -> FakeClock:
    """A `FakeClock`: time moves only when the test moves it (`advance`, `run_for`)."""
    return FakeClock()


@pytest.fixture
def tiers_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of a fresh, empty database for this test alone (see the module's doc)."""
    base = request.config.getoption("tiers_database_url") or os.environ.get(ENV_DATABASE_URL)
    if not base:
        yield f"sqlite:///{tmp_path / 'tiers.db'}"
        return
    with _fresh_schema(base) as url:
        yield url


class _Retriers:
    """What `tiers_make_retrier` gives: a callable that builds Retriers and keeps them."""

    def __init__(self, url: str, clock: FakeClock) -> None:
        self.url = url
        self.clock = clock
        self.made: list[Retrier] = []

    def __call__(self, **options: Any) -> Retrier:
        options.setdefault("clock", self.clock)
        retrier = Retrier(options.pop("url", self.url), **options)
        self.made.append(retrier)
        return retrier

    def close(self) -> int:
        """Close every Retrier; return how many connections were left checked out."""
        leaked = 0
        for retrier in self.made:
            leaked += retrier.store.checked_out()
            retrier.close()
        return leaked


@pytest.fixture
def tiers_make_retrier(tiers_database_url: str, tiers_clock: FakeClock) -> Iterator[_Retriers]:
    """`tiers_make_retrier(**options)` builds `Retrier(tiers_database_url,
    clock=tiers_clock, **options)` (`url=` to use another database). After the test,
    each is closed, and the test fails if one left a database connection checked out
    (a session never closed, say)."""
    retriers = _Retriers(tiers_database_url, tiers_clock)
    yield retriers
    leaked = retriers.close()
    if leaked:
        pytest.fail(f"{leaked} database connection(s) left checked out by the test")


@pytest.fixture
def tiers_retrier(tiers_make_retrier: _Retriers) -> Retrier:
    """A `Retrier` on `tiers_database_url` and `tiers_clock`; register the app's actions
    on it (see docs/testing.md for an app built around a given Retrier)."""
    return tiers_make_retrier()


@pytest.fixture
def tiers_drain(tiers_make_retrier: _Retriers) -> Callable[..., None]:
    """`tiers_drain(target=None, **options)`: `retrier.testing.drain(target, **options)`;
    with no target, drain every Retrier `tiers_make_retrier` (or `tiers_retrier`) built
    in this test."""

    def drain_all(target: Target | None = None, **options: Any) -> None:
        if target is not None:
            drain(target, **options)
            return
        if not tiers_make_retrier.made:
            raise ValueError(
                "tiers_drain() has nothing to drain: no Retrier was built with "
                "tiers_make_retrier or tiers_retrier; pass the Retrier (or pool) to drain"
            )
        for retrier in tiers_make_retrier.made:
            drain(retrier, **options)

    return drain_all


@contextlib.contextmanager
def _fresh_schema(base: str) -> Iterator[str]:
    """`base` (a PostgreSQL URL) with a schema of its own as its search path, for one
    test; the schema is dropped afterwards."""
    url = make_url(base)
    if url.get_backend_name() != "postgresql":
        raise pytest.UsageError(
            f"--tiers-database-url (or ${ENV_DATABASE_URL}) takes a PostgreSQL URL, "
            f"got {url.get_backend_name()!r}; SQLite tests get a fresh file without it"
        )
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    schema = f"tiers_test_{uuid.uuid4().hex[:12]}"
    options = url.query.get("options")
    search_path = f"-csearch_path={schema}"
    merged = f"{options} {search_path}" if isinstance(options, str) else search_path
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield url.update_query_dict({"options": merged}).render_as_string(
                hide_password=False
            )
        finally:
            with engine.begin() as conn:
                # A connection the test left inside a transaction would block the drop.
                conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        engine.dispose()
