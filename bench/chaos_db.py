"""Databases for `bench.chaos`, and the disruptions each one can suffer.

- `SqliteDatabase`: a file in a temporary directory; no disruption.
- `PostgresSchema`: a fresh schema on a shared server. Workers connect with an
  application_name of their own, so a disruption terminates their backends
  (`pg_terminate_backend`) and no one else's.
- `PostgresCluster`: a throwaway cluster of its own (`pg_createcluster`, needs root
  and the Debian PostgreSQL tools) on another port; a disruption restarts the whole
  server (`pg_ctlcluster ... restart`). Dropped at the end. The shared server is
  never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

PG_BASE = os.environ.get("TIERS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class Database(Protocol):
    """Where a chaos run keeps its state, and how to shake it."""

    url: str  # for the harness's own connections
    label: str  # how the report names it
    disruption: str | None  # "restart", "terminate" or None

    def worker_url(self, number: int) -> str:
        """The URL worker number `number` connects with (on PostgreSQL, its own
        application_name: the server's log and pg_stat_activity then name it)."""
        ...

    def disrupt(self) -> str:
        """Shake the database once; returns what was done, for the progress line."""
        ...

    def server_log(self) -> str | None:
        """The server's log, if it is the harness's own server."""
        ...


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1).split("?")[0]


class SqliteDatabase:
    def __init__(self, url: str) -> None:
        self.url = url
        self.label = "sqlite (one file, WAL)"
        self.disruption: str | None = None

    def worker_url(self, number: int) -> str:
        return self.url

    def disrupt(self) -> str:
        return "nothing to disrupt on SQLite"

    def server_log(self) -> str | None:
        return None


class PostgresSchema:
    """A schema of its own on a shared server; disruption: terminate the workers' backends."""

    def __init__(self, base: str, schema: str, *, terminate: bool) -> None:
        self.base = base
        self.schema = schema
        self.app_name = f"chaos-{schema}"
        self.url = f"{base}?options=-csearch_path%3D{schema}"
        self.label = f"postgresql (schema {schema} on the shared server)"
        self.disruption = "terminate" if terminate else None

    def worker_url(self, number: int) -> str:
        return f"{self.url}&application_name={self.app_name}-w{number}"

    def disrupt(self) -> str:
        import psycopg

        with psycopg.connect(libpq(self.base), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
                (f"{self.app_name}-w%",),
            ).fetchone()
        return f"terminated {row[0] if row else 0} worker backends"

    def server_log(self) -> str | None:
        return None


class PostgresCluster:
    """A server of its own; disruption: restart it."""

    def __init__(self, version: str, name: str, port: int) -> None:
        self.version = version
        self.name = name
        self.port = port
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self.label = f"postgresql (own cluster {version}/{name} on port {port})"
        self.disruption: str | None = "restart"

    def worker_url(self, number: int) -> str:
        return f"{self.url}?application_name=chaos-w{number}"

    def disrupt(self) -> str:
        began = time.monotonic()
        _ctl(self.version, self.name, "restart", "-m", "fast")
        return f"restarted the server in {time.monotonic() - began:.1f} s"

    def server_log(self) -> str | None:
        path = Path(f"/var/log/postgresql/postgresql-{self.version}-{self.name}.log")
        return path.read_text(errors="replace") if path.exists() else None


def can_make_cluster() -> bool:
    """Whether this process can create (and restart) a PostgreSQL cluster of its own."""
    return (
        hasattr(os, "geteuid")
        and os.geteuid() == 0
        and shutil.which("pg_createcluster") is not None
        and _pg_version() is not None
    )


def _pg_version() -> str | None:
    root = Path("/usr/lib/postgresql")
    versions = sorted((p.name for p in root.iterdir() if (p / "bin" / "postgres").exists()),
                      key=lambda v: [int(x) for x in v.split(".") if x.isdigit()]) \
        if root.is_dir() else []
    return versions[-1] if versions else None


def _ctl(version: str, name: str, *action: str) -> None:
    subprocess.run(["pg_ctlcluster", version, name, *action], check=True,
                   capture_output=True, timeout=120)


def database_for(url: str, *, terminate: bool = True) -> SqliteDatabase | PostgresSchema:
    """The database of a URL made elsewhere (a SQLite file, or a PostgreSQL URL with
    `?options=-csearch_path%3D<schema>`, as the test suite's `db_url` fixture makes)."""
    if url.startswith("sqlite"):
        return SqliteDatabase(url)
    base, _, query = url.partition("?")
    schema = query.partition("search_path%3D")[2].partition("&")[0]
    if not schema:
        raise ValueError(f"no search_path schema in {url!r}")
    return PostgresSchema(base, schema, terminate=terminate)


@contextmanager
def sqlite_database(directory: Path) -> Iterator[SqliteDatabase]:
    yield SqliteDatabase(f"sqlite:///{directory / 'chaos.db'}")


@contextmanager
def postgres_schema(base: str = PG_BASE, *, terminate: bool = True) -> Iterator[PostgresSchema]:
    """A fresh schema on the shared server, dropped afterwards."""
    import psycopg

    schema = f"chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq(base), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield PostgresSchema(base, schema, terminate=terminate)
    finally:
        with psycopg.connect(libpq(base), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def postgres_cluster(port: int) -> Iterator[PostgresCluster]:
    """A throwaway cluster on `port` (trust authentication), dropped afterwards."""
    version = _pg_version()
    assert version is not None, "no PostgreSQL server binaries under /usr/lib/postgresql"
    name = f"chaos{os.getpid()}"
    subprocess.run(
        ["pg_createcluster", version, name, "-p", str(port),
         # The application_name (%a) names the worker in every line of the log.
         "-o", "log_line_prefix=%m [%p] %a ", "-o", "log_connections=on", "--",
         "--auth-local=trust", "--auth-host=trust"],
        check=True, capture_output=True, timeout=120,
    )
    try:
        _ctl(version, name, "start")
        yield PostgresCluster(version, name, port)
    finally:
        subprocess.run(["pg_dropcluster", "--stop", version, name],
                       check=False, capture_output=True, timeout=120)


_CONNECTION = re.compile(r"\[(\d+)\] .*connection authorized: .*application_name=(\S+)")
_WAITS = re.compile(r"Process (\d+) waits for (.+?); blocked by process (\d+)\.")
_STATEMENT = re.compile(r"^\s*Process (\d+): (.*)$")


def deadlocks(server_log: str) -> list[str]:
    """The deadlocks a server's log reports, each as the two backends' application
    names (so, which workers) and the start of their statements."""
    names = {pid: name for pid, name in _CONNECTION.findall(server_log)}
    lines = server_log.splitlines()
    found = []
    for index, line in enumerate(lines):
        if "ERROR:  deadlock detected" not in line:
            continue
        statements: dict[str, str] = {}
        for follow in lines[index + 1:index + 12]:
            match = _STATEMENT.match(follow)
            if match:
                statements.setdefault(match.group(1), " ".join(match.group(2).split())[:70])
        parts = [f"{names.get(pid, '?')} [{pid}] {sql}" for pid, sql in statements.items()]
        found.append(" <-> ".join(parts) or line)
    return found
