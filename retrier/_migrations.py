"""Running durable-tiers' Alembic migrations: the engine's branch, and the branches
higher tiers add (found through the `tiers.migrations` entry points), each applied
only where it is in use, all in one version table of our own.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy import Connection, inspect

from ._errors import SchemaTooNew

VERSION_TABLE = "tiers_alembic_version"
"""Where durable-tiers records its migrations: never the app's `alembic_version`."""

_HERE = Path(__file__).parent / "migrations"

# Tables that show a database was created before migrations, by branch, and the
# revision that created them then.
_LEGACY = {
    "engine": ("tiers_runs", "engine_0001"),
    "workflow": ("tiers_workflows", "workflow_0001"),
}


@dataclass(frozen=True, slots=True)
class Branch:
    """A line of migrations: its label (its revisions are named `<label>_NNNN`) and
    the folder of its revision scripts."""

    label: str
    versions: Path


ENGINE = Branch("engine", _HERE / "versions")


def installed_branches() -> list[Branch]:
    """The engine's branch and every installed tier's (`tiers.migrations` entry points)."""
    found = [ENGINE]
    for ep in entry_points(group="tiers.migrations"):
        branch = ep.load()
        if isinstance(branch, Branch) and branch not in found:
            found.append(branch)
    return found


class Migrations:
    """The migrations a database may have: every installed branch, applied on demand."""

    def __init__(self, branches: Iterable[Branch] = ()) -> None:
        known = installed_branches()
        known.extend(b for b in branches if b not in known)
        self.branches = {b.label: b for b in known}

    def config(self, conn: Connection | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", str(_HERE))
        config.set_main_option("path_separator", "os")
        locations = os.pathsep.join(str(b.versions) for b in self.branches.values())
        config.set_main_option("version_locations", locations)
        if conn is not None:
            config.attributes["connection"] = conn
        return config

    @property
    def script(self) -> ScriptDirectory:
        return _script(tuple(str(b.versions) for b in self.branches.values()))

    def heads(self, labels: Iterable[str] | None = None) -> set[str]:
        """The newest revision of each branch (of `labels`, if given)."""
        wanted = set(self.branches if labels is None else labels)
        return {h for h in self.script.get_heads() if h.split("_", 1)[0] in wanted}

    def current(self, conn: Connection) -> set[str]:
        """The revisions the database is at (one per branch it has)."""
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return set(context.get_current_heads())

    def history(self) -> list[Script]:
        """Every known revision, newest first."""
        return list(self.script.walk_revisions())

    def upgrade(self, conn: Connection, labels: Sequence[str] = ("engine",)) -> list[str]:
        """Bring the branches `labels` to their newest revision, in `conn`'s
        transaction; returns the revisions applied. A database that predates
        migrations is first stamped with the revisions that created it; one with a
        revision this code does not know raises `SchemaTooNew`."""
        self._stamp_legacy(conn)
        current = self.current(conn)
        self._refuse_unknown(current)
        wanted = self.heads(labels)
        if wanted <= current:
            return []
        for label in labels:
            self._upgrade_to_head(conn, label)
        return self._between(self.current(conn), current)

    def _upgrade_to_head(self, conn: Connection, label: str) -> None:
        """What `alembic upgrade <label>@head` does (`command.upgrade`, then env.py),
        with the scripts read once per process (`_script`): the command reads and
        compiles every revision file again at each call."""
        script = self.script
        target = f"{label}@head"

        def to_head(revision: Any, _context: MigrationContext) -> Any:
            return script._upgrade_revs(target, revision)

        with EnvironmentContext(
            self.config(conn), script, fn=to_head, destination_rev=target
        ) as env:
            env.configure(connection=conn, version_table=VERSION_TABLE, transactional_ddl=True)
            with env.begin_transaction():
                env.run_migrations()

    def _between(self, new: set[str], old: set[str]) -> list[str]:
        """The revisions below the heads `new` that are not below the heads `old`."""
        return sorted(self._below(new) - self._below(old))

    def _below(self, heads: set[str]) -> set[str]:
        """The heads and every revision they build on (dependencies included)."""
        return {
            script.revision
            for head in heads
            for script in self.script.iterate_revisions(head, "base")
        }

    def _refuse_unknown(self, current: set[str]) -> None:
        known = {s.revision for s in self.script.walk_revisions()}
        for revision in sorted(current - known):
            label = revision.split("_", 1)[0]
            raise SchemaTooNew(revision, ", ".join(sorted(self.heads([label]))) or "none")

    def _stamp_legacy(self, conn: Connection) -> None:
        inspector = inspect(conn)
        if inspector.has_table(VERSION_TABLE):
            return
        created = [
            revision
            for label, (table, revision) in _LEGACY.items()
            if label in self.branches and inspector.has_table(table)
        ]
        config = self.config(conn)
        for revision in created:  # one at a time: workflow_0001 depends on engine_0001
            command.stamp(config, revision)


def upgrade(conn: Connection, labels: Sequence[str] | None = None) -> list[str]:
    """Apply durable-tiers' migrations on `conn`, in its transaction (from an app's own
    Alembic env.py, say); every installed branch unless `labels` says which."""
    migrations = Migrations()
    return migrations.upgrade(conn, tuple(labels or migrations.branches))


@functools.lru_cache(maxsize=8)
def _script(locations: tuple[str, ...]) -> ScriptDirectory:
    # The scripts are read once per process and set of branches: they do not change.
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", os.pathsep.join(locations))
    return ScriptDirectory.from_config(config)
