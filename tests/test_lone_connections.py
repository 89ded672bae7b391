"""The connections for lone statements (an enqueue's INSERT), on SQLite and
PostgreSQL: configured as the engine's pool configures its own and switched into
lone-statement mode once, reused, closed when given back unusable, never carried
across a fork, closed with the dialect."""

from __future__ import annotations

import os
from typing import Any

import pytest

from retrier import Retrier
from retrier._lone_connections import LoneConnections


def lone_of(retrier: Retrier) -> LoneConnections[Any]:
    lone = retrier.store.dialect._lone  # type: ignore[union-attr]
    assert isinstance(lone, LoneConnections)
    return lone


def is_closed(raw: Any) -> bool:
    closed = getattr(raw, "closed", None)
    if isinstance(closed, bool):  # psycopg
        return closed
    try:
        raw.execute("SELECT 1")  # sqlite3: no attribute says
    except Exception:
        return True
    return False


def open_transaction(raw: Any) -> None:
    if hasattr(raw, "autocommit") and not hasattr(raw, "in_transaction"):  # psycopg
        raw.autocommit = False
    raw.execute("BEGIN" if hasattr(raw, "in_transaction") else "SELECT 1")


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_a_lone_connection_is_configured_as_the_pools_in_lone_statement_mode(
    db_url: str, durability: str
) -> None:
    retrier = Retrier(db_url, durability=durability)  # type: ignore[arg-type]
    try:
        with lone_of(retrier).connection() as raw:
            if retrier.store.dialect.name == "sqlite":
                level = {"full": 2, "normal": 1}[durability]
                assert raw.execute("PRAGMA synchronous").fetchone() == (level,)
                assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
                assert raw.execute("PRAGMA busy_timeout").fetchone() == (0,)
                assert raw.isolation_level is None, "each statement commits alone"
            else:
                assert raw.autocommit is True
                schema = raw.execute("SELECT current_schema()").fetchone()[0]
                assert schema.startswith("t_"), "the URL's search_path, as the pool's"
                sync = raw.execute("SHOW synchronous_commit").fetchone()[0]
                assert sync == "on", "an enqueue always waits for its commit"
        assert retrier.store.checked_out() == 0, "it left the pool: nothing checked out"
    finally:
        retrier.close()


def test_enqueues_reuse_one_connection_and_an_unusable_one_is_not_kept(db_url: str) -> None:
    retrier = Retrier(db_url)
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
        assert lone._spare == [used], "an error that left it usable: kept"
        with lone.connection() as raw:
            open_transaction(raw)  # as a failure half-way could leave it
        assert lone._spare == [] and is_closed(used)
        retrier.run(work)  # opens another
        assert len(lone._spare) == 1 and lone._spare[0] is not used
        assert retrier.status(retrier.run(work)).state == "in_progress"
    finally:
        retrier.close()


def test_at_most_keep_spare_connections_stay_open(db_url: str) -> None:
    retrier = Retrier(db_url)
    try:
        lone = lone_of(retrier)
        with lone.connection() as a, lone.connection() as b, lone.connection() as c:
            with lone.connection() as d, lone.connection() as e:
                opened = [a, b, c, d, e]
        assert len({id(raw) for raw in opened}) == 5, "one connection per concurrent user"
        assert len(lone._spare) == 4
        assert is_closed(a), "the fifth given back was closed"
        assert not any(is_closed(raw) for raw in opened[1:])
    finally:
        retrier.close()


def test_closing_closes_spare_connections_and_those_in_use_when_given_back(
    db_url: str,
) -> None:
    retrier = Retrier(db_url)
    lone = lone_of(retrier)
    with lone.connection() as in_use:
        with lone.connection() as spare:
            pass  # given back: a spare
        retrier.close()
        assert is_closed(spare)
        assert not is_closed(in_use), "still usable until given back"
    assert is_closed(in_use)
    assert lone._spare == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection_and_leaves_its_parents_alone(
    db_url: str,
) -> None:
    retrier = Retrier(db_url)
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
                # As SQLAlchemy asks of a child: leave the parent's pooled connections.
                retrier.store.dialect.engine.dispose(close=False)
                with lone.connection() as raw:
                    code = 3 if raw is parents else 0
                retrier.run(work)
                code = code or (0 if parents not in lone._spare else 4)
                lone.close()  # closes the child's own only
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert lone._spare == [parents] and not is_closed(parents)
        retrier.run(work)  # the parent's connection still works: its session lives
        assert lone._spare == [parents]
        with retrier.store.dialect.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM tiers_runs").scalar() == 3
    finally:
        retrier.close()


def test_at_most_limit_connections_are_in_use_at_once(db_url: str) -> None:
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    retrier = Retrier(db_url)
    dialect = retrier.store.dialect
    own = lone_of(retrier)
    lone = LoneConnections(
        dialect.engine, own._kind, own._prepare, own._usable, limit=2, timeout=0.05
    )
    try:
        with lone.connection(), lone.connection():
            with pytest.raises(PoolTimeout, match="2 connections"), lone.connection():
                pass
        with lone.connection(), lone.connection():
            pass  # both given back: free again
        assert len(lone._spare) == 2
    finally:
        lone.close()
        retrier.close()


def test_a_connection_opened_on_one_thread_serves_anothers_enqueues(db_url: str) -> None:
    import threading

    retrier = Retrier(db_url)
    try:

        @retrier.action
        def work() -> None: ...

        retrier.run(work)  # opens it on this thread
        (opened,) = lone_of(retrier)._spare
        failed: list[BaseException] = []

        def enqueue() -> None:
            try:
                for _ in range(5):
                    retrier.run(work)
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=enqueue)
        thread.start()
        thread.join()
        assert failed == []
        assert lone_of(retrier)._spare == [opened], "the same connection, on the other thread"
    finally:
        retrier.close()
