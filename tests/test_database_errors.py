"""Database failures get a short `TiersError` that names the problem and never shows
a password: malformed and unsupported URLs, an unreachable server, a missing database,
a database without the tables, a database locked past its timeout. In the `tiers`
command line: one line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url

from retrier import (
    DatabaseBusy,
    DatabaseUnavailable,
    InvalidDatabaseURL,
    Retrier,
    SchemaMissing,
)
from retrier._cli import main
from workflow import WorkflowManager
from workpool import Workpool

SECRET = "s3cretPW"


def tiers(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"TIERS_DATABASE_URL": "", "TIERS_APP": ""})


def assert_one_line_error(result: Result, *expected: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for text in expected:
        assert text in result.output, result.output
    assert SECRET not in result.output


def kind_of(db_url: str) -> str:
    return "sqlite" if db_url.startswith("sqlite") else "postgresql"


# -- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "error", "shown"),
    [
        (f"mysql://u:{SECRET}@h/db", InvalidDatabaseURL, "mysql://u:***@h/db"),
        (f"postgresql+asyncpg://u:{SECRET}@h/db", InvalidDatabaseURL, None),
        (f"postgresql://u:{SECRET}@h:notaport/db", InvalidDatabaseURL, "***@h:notaport/db"),
        (f"u:{SECRET}@h/db", InvalidDatabaseURL, "***@h/db"),
        (f"postgresql://u:{SECRET}@nowhere.invalid/db?password={SECRET}", DatabaseUnavailable,
         "u:***@nowhere.invalid/db?password=***"),
    ],
)
def test_a_database_error_never_shows_the_password(
    url: str, error: type[Exception], shown: str | None
) -> None:
    with pytest.raises(error) as info:
        Retrier(url)
    assert SECRET not in str(info.value)
    if shown is not None:
        assert shown in str(info.value)
    assert_one_line_error(tiers("--db", url, "runs", "list"))


def _unreachable(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'tiers.db'}"
    return f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/db"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_unreachable_database_raises_database_unavailable(kind: str, tmp_path: Path) -> None:
    url = _unreachable(kind, tmp_path)
    with pytest.raises(DatabaseUnavailable) as info:
        Retrier(url)
    assert SECRET not in str(info.value) and "\n" not in str(info.value)
    assert "cannot" in str(info.value)
    # The command line, which never creates a database, finds a SQLite file missing first.
    expected = "does not exist" if kind == "sqlite" else "cannot"
    assert_one_line_error(tiers("--db", url, "runs", "list"), expected)
    assert_one_line_error(tiers("--db", url, "pools", "list"), expected)


# -- a database that is missing, or has no tables ----------------------------------------------


def _missing(db_url: str, tmp_path: Path) -> str:
    if kind_of(db_url) == "sqlite":
        return f"sqlite:///{tmp_path / 'missing.db'}"
    return make_url(db_url).set(database="tiers_no_such_db").render_as_string(hide_password=False)


def test_the_cli_releases_its_connections(
    retrier: Retrier, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retrier._cli as cli

    opened: list[Any] = []

    class Recorded(cli.Store):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(cli, "Store", Recorded)
    for command in (["runs", "list"], ["runs", "show", "nope"], ["pools", "list"]):
        tiers("--db", db_url, *command)
    assert len(opened) == 3
    assert all(store.checked_out() == 0 for store in opened)
    assert all(store.engine.pool.checkedin() == 0 for store in opened), "disposed"


def test_the_cli_refuses_a_database_that_does_not_exist(db_url: str, tmp_path: Path) -> None:
    url = _missing(db_url, tmp_path)
    for command in (["runs", "list"], ["runs", "show", "x"], ["pools", "list"],
                    ["workflows", "list"]):
        assert_one_line_error(tiers("--db", url, *command), "does not exist")
    assert not (tmp_path / "missing.db").exists(), "the CLI must not create a database"


@pytest.fixture
def empty_db(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A database (file or schema) that exists but has no durable-tiers tables."""
    if kind_of(db_url) == "sqlite":
        path = make_url(db_url).database
        assert path is not None
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE unrelated (x INTEGER)")
        conn.close()
    yield db_url


def test_the_cli_explains_a_database_without_the_tables(empty_db: str) -> None:
    for command in (["runs", "list"], ["runs", "cancel", "x"], ["pools", "show", "p"],
                    ["workflows", "list"], ["runs", "cleanup", "--older-than", "1"]):
        assert_one_line_error(tiers("--db", empty_db, *command), "no durable-tiers tables")


def test_a_database_with_only_the_engine_tables_lacks_the_workflow_ones(
    retrier: Retrier, db_url: str
) -> None:
    assert_one_line_error(tiers("--db", db_url, "workflows", "list"), "tiers_workflows")
    WorkflowManager(Workpool(retrier, "p"))
    listed = tiers("--db", db_url, "workflows", "list")
    assert listed.exit_code == 0, listed.output


def test_the_api_raises_schema_missing_when_tables_are_dropped(retrier: Retrier) -> None:
    with retrier.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE tiers_runs")
    with pytest.raises(SchemaMissing, match="tiers_runs"):
        retrier.status("x")

    @retrier.action
    def work() -> None: ...

    with pytest.raises(SchemaMissing):
        retrier.run(work)


# -- a database locked past its timeout ---------------------------------------------------------


@pytest.fixture
def hold_write_lock(db_url: str) -> Callable[[], Any]:
    """A context manager factory: while open, another connection holds the lock an
    enqueue needs."""
    import contextlib

    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        if kind_of(db_url) == "sqlite":
            path = make_url(db_url).database
            assert path is not None
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                conn.execute("ROLLBACK")
                conn.close()
            return
        url = make_url(db_url)
        schema = str(url.query["options"]).split("=", 1)[1]
        dsn = url.set(drivername="postgresql", query={}).render_as_string(hide_password=False)
        with psycopg.connect(dsn) as conn:
            conn.execute(f"LOCK TABLE {schema}.tiers_runs IN ACCESS EXCLUSIVE MODE")
            try:
                yield
            finally:
                conn.rollback()

    return hold


def test_an_enqueue_on_a_locked_database_raises_database_busy(
    db_url: str, hold_write_lock: Callable[[], Any]
) -> None:
    # PostgreSQL waits on locks as long as lock_timeout says (forever by default),
    # SQLite as long as the URL's timeout (30 s by default); the test sets 200 ms, as
    # an application may in its URL.
    sqlite = kind_of(db_url) == "sqlite"
    url = db_url + ("?timeout=0.2" if sqlite else "%20-clock_timeout%3D200")
    retrier = Retrier(url)
    try:

        @retrier.action
        def work() -> None: ...

        pool = Workpool(retrier, "p")
        with hold_write_lock():
            for enqueue in (lambda: retrier.run(work),
                            lambda: pool.enqueue_batch([(work, {}), (work, {})])):
                with pytest.raises(DatabaseBusy) as info:
                    enqueue()
                assert "locked" in str(info.value) and "\n" not in str(info.value)
        assert isinstance(DatabaseBusy("x"), DatabaseUnavailable)
        retrier.run(work)  # the lock is gone: works again
        assert retrier.store.checked_out() == 0
    finally:
        retrier.close()


@pytest.mark.parametrize("timeout", ["-1", "nan", "soon", "7200"])
def test_a_bad_sqlite_timeout_is_refused(tmp_path: Path, timeout: str) -> None:
    with pytest.raises(InvalidDatabaseURL, match="timeout"):
        Retrier(f"sqlite:///{tmp_path}/x.db?timeout={timeout}")
