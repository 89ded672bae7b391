"""SQLite's connections for lone statements (an enqueue's INSERT): configured as the
engine's pool configures its own, busy handler off, reused, never carried across a
fork, closed with the dialect."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from retrier import Retrier
from retrier._lone_connections import LoneConnections
from retrier._sqlite import SQLiteDialect


def lone_of(retrier: Retrier) -> LoneConnections:
    dialect = retrier.store.dialect
    assert isinstance(dialect, SQLiteDialect)
    return dialect._lone


@pytest.mark.parametrize(("durability", "level"), [("full", 2), ("normal", 1)])
def test_a_lone_connection_is_configured_as_the_pools_with_its_busy_handler_off(
    tmp_path: Path, durability: str, level: int
) -> None:
    retrier = Retrier(f"sqlite:///{tmp_path}/x.db", durability=durability)  # type: ignore[arg-type]
    try:
        with lone_of(retrier).connection() as raw:
            assert raw.execute("PRAGMA synchronous").fetchone() == (level,)
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert raw.execute("PRAGMA busy_timeout").fetchone() == (0,)
            assert raw.isolation_level is None, "each statement commits alone"
        assert retrier.store.checked_out() == 0, "it left the pool: nothing checked out"
    finally:
        retrier.close()


def test_enqueues_reuse_one_connection_and_one_that_raised_is_not_kept(tmp_path: Path) -> None:
    retrier = Retrier(f"sqlite:///{tmp_path}/x.db")
    try:

        @retrier.action
        def work() -> None: ...

        lone = lone_of(retrier)
        for _ in range(20):
            retrier.run(work)
        assert len(lone._spare) == 1, "twenty enqueues in a row take the same connection"
        used = lone._spare[0]
        with pytest.raises(ZeroDivisionError), lone.connection() as raw:
            assert raw is used
            raise ZeroDivisionError
        assert lone._spare == []
        with pytest.raises(sqlite3.ProgrammingError):
            used.execute("SELECT 1")  # closed
        retrier.run(work)  # opens another
        assert len(lone._spare) == 1 and lone._spare[0] is not used
    finally:
        retrier.close()


def test_at_most_keep_spare_connections_stay_open(tmp_path: Path) -> None:
    retrier = Retrier(f"sqlite:///{tmp_path}/x.db")
    try:
        lone = lone_of(retrier)
        opened = []
        with lone.connection() as a, lone.connection() as b, lone.connection() as c:
            with lone.connection() as d, lone.connection() as e:
                opened = [a, b, c, d, e]
        assert len({id(raw) for raw in opened}) == 5, "one connection per concurrent user"
        assert len(lone._spare) == 4
        with pytest.raises(sqlite3.ProgrammingError):
            a.execute("SELECT 1")  # the fifth given back was closed
    finally:
        retrier.close()


def test_closing_closes_spare_connections_and_those_in_use_when_given_back(
    tmp_path: Path,
) -> None:
    retrier = Retrier(f"sqlite:///{tmp_path}/x.db")
    lone = lone_of(retrier)
    with lone.connection() as in_use:
        with lone.connection() as spare:
            pass  # given back: a spare
        retrier.close()
        with pytest.raises(sqlite3.ProgrammingError):
            spare.execute("SELECT 1")
        in_use.execute("SELECT 1")  # still usable until given back
    with pytest.raises(sqlite3.ProgrammingError):
        in_use.execute("SELECT 1")
    assert lone._spare == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection_and_leaves_its_parents_open(
    tmp_path: Path,
) -> None:
    retrier = Retrier(f"sqlite:///{tmp_path}/x.db")
    try:

        @retrier.action
        def work() -> None: ...

        retrier.run(work)
        lone = lone_of(retrier)
        (parents,) = lone._spare
        pid = os.fork()
        if pid == 0:  # the child: enqueue, then report whether it used its parent's
            code = 1
            try:
                with lone.connection() as raw:
                    code = 3 if raw is parents else 0
                retrier.run(work)
                code = code or (0 if parents not in lone._spare else 4)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert lone._spare == [parents]
        retrier.run(work)  # the parent's connection still works
        with retrier.store.dialect.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM tiers_runs").scalar() == 3
    finally:
        retrier.close()
