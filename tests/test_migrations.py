"""durable-tiers' Alembic migrations, on SQLite and PostgreSQL: they build exactly the
models' schema, they upgrade a database made before migrations, they refuse one made
by a newer release, they run once when many processes start together, and they keep
clear of an app's own Alembic history."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner

from retrier import Retrier, SchemaTooNew
from retrier._cli import main
from retrier._migrations import VERSION_TABLE, Migrations
from retrier._models import ENGINE_TABLES
from retrier.migrations import upgrade
from workflow import WorkflowManager
from workflow._models import TABLES as WORKFLOW_TABLES
from workpool import Workpool


def versions(retrier: Retrier) -> set[str]:
    with retrier.engine.connect() as conn:
        return {r for (r,) in conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))}


def _partial_indexes(conn: sa.Connection) -> set[str]:
    """The indexes in the database that have a WHERE (alembic's comparison does not
    look at index predicates)."""
    if conn.dialect.name == "sqlite":
        tables = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {
            row[1]
            for (table,) in tables.all()
            for row in conn.exec_driver_sql(f"PRAGMA index_list('{table}')")
            if row[4]  # partial
        }
    return set(conn.exec_driver_sql(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE i.indpred IS NOT NULL AND n.nspname = current_schema()"
    ).scalars())


def test_the_migrations_build_exactly_the_models_schema(db_url: str) -> None:
    retrier = Retrier(db_url)
    WorkflowManager(Workpool(retrier, "p"))
    models = sa.MetaData()
    for table in [*ENGINE_TABLES, *WORKFLOW_TABLES]:
        table.to_metadata(models)
    try:
        with retrier.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, models)
            partial = _partial_indexes(conn)
        # Only our version table is not a model.
        assert [d[0] for d in differences] == ["remove_table"]
        assert differences[0][1].name == VERSION_TABLE
        assert partial == {
            index.name
            for table in models.tables.values()
            for index in table.indexes
            if index.dialect_options["sqlite"]["where"] is not None
        }
        assert versions(retrier) == {"engine_0010", "workflow_0008"}
    finally:
        retrier.close()


def test_an_engine_only_app_gets_no_workflow_tables(db_url: str) -> None:
    retrier = Retrier(db_url)
    try:
        assert versions(retrier) == {"engine_0010"}
        with retrier.engine.connect() as conn:
            assert not sa.inspect(conn).has_table("tiers_workflows")
    finally:
        retrier.close()


def test_a_database_from_before_migrations_is_stamped_then_upgraded(db_url: str) -> None:
    """Made by the baseline alone, as release 94c3053's create_all made it (no version
    table), with a run in it: starting a Retrier adds what came since, keeps the run."""
    engine = sa.create_engine(db_url)
    migrations = Migrations()
    with engine.begin() as conn:
        command.upgrade(migrations.config(conn), "engine_0001")
        conn.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))
        conn.execute(
            sa.text(
                "INSERT INTO tiers_runs (id, fn, args, state, attempts, failures, due_ms, "
                "priority, queue, fence, cancel_requested, initial_backoff_ms, base, "
                "max_failures, jitter, max_backoff_ms, handler_failures, created_ms) VALUES "
                "('old', 'work', '{}', 'pending', 0, 0, 0, 0, '', 0, false, 250, 2, 4, false, "
                "3600000, 0, 0)"
            )
        )
    engine.dispose()
    retrier = Retrier(db_url)
    try:
        assert versions(retrier) == {"engine_0010"}

        @retrier.action(name="work")
        def work() -> str:
            return "done"

        from tests.support import drain

        drain(retrier)
        assert retrier.store.get("old").state == "completed"
        with retrier.engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("tiers_attempts")}
            schema_version = conn.execute(sa.text("SELECT value FROM tiers_meta")).scalar()
        assert "traceback" in columns and schema_version == 2
    finally:
        retrier.close()


def test_a_database_a_newer_release_migrated_is_refused(db_url: str) -> None:
    first = Retrier(db_url)
    with first.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = 'engine_0099'"))
    first.close()
    with pytest.raises(SchemaTooNew, match="engine_0099"):
        Retrier(db_url)


def test_processes_starting_at_once_migrate_once(db_url: str) -> None:
    started = threading.Barrier(4)
    made: list[Retrier] = []
    errors: list[BaseException] = []

    def start() -> None:
        started.wait(10)
        try:
            made.append(Retrier(db_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == [] and len(made) == 4
        assert versions(made[0]) == {"engine_0010"}
    finally:
        for retrier in made:
            retrier.close()


def test_an_apps_own_alembic_history_is_left_alone(db_url: str) -> None:
    """An app that runs our migrations from its own env.py, in its transaction."""
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
            conn.execute(sa.text("INSERT INTO alembic_version VALUES ('app_0007')"))
            applied = upgrade(conn)
        assert applied == [
            "engine_0001", "engine_0002", "engine_0003", "engine_0004", "engine_0006",
            "engine_0007", "engine_0008", "engine_0009", "engine_0010",
            "workflow_0001", "workflow_0002", "workflow_0003", "workflow_0004",
            "workflow_0005", "workflow_0006", "workflow_0007", "workflow_0008",
        ]
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
                ("app_0007",)
            ]
        retrier = Retrier(db_url)
        assert versions(retrier) == {"engine_0010", "workflow_0008"}
        retrier.close()
    finally:
        engine.dispose()


def test_the_db_commands(db_url: str, tmp_path: Any) -> None:
    cli = CliRunner()
    upgraded = cli.invoke(main, ["--db", db_url, "db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert "applied engine_0001" in upgraded.output and "17 migration(s)" in upgraded.output
    again = cli.invoke(main, ["--db", db_url, "db", "upgrade"])
    assert again.exit_code == 0 and "up to date" in again.output
    current = cli.invoke(main, ["--db", db_url, "db", "current"])
    assert current.exit_code == 0 and "engine_0010" in current.output
    history = cli.invoke(main, ["db", "history"])
    assert history.exit_code == 0 and "engine_0001" in history.output
    listed = cli.invoke(main, ["db", "history", "--json"])
    revisions = {m["revision"]: m["follows"] for m in json.loads(listed.output)}
    assert revisions["engine_0002"] == "engine_0001" and "workflow_0001" in revisions
    bad = cli.invoke(main, ["--db", db_url, "db", "upgrade", "--branch", "nope"])
    assert bad.exit_code != 0 and "no branch" in bad.output
