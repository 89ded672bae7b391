"""PostgreSQL announces new runs only while a worker wants to hear of them
(`retrier/_pg_wants.py`): an insert sends a NOTIFY only if it cannot take the
announcement lock, which each wanting worker holds shared. These tests watch the wake
channel directly, and check that no run is left unannounced: an insert that sent no
NOTIFY is claimed once a worker wants announcements again, and a worker whose records
pause (a long action in flight) starts a new run at once, with no poll to help it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

from retrier import Retrier
from retrier._pg_wants import LOCK_CLASS, PgWants
from retrier._postgres import libpq_dsn

# Only PostgreSQL announces through the trigger (SQLite pings every insert).
pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def pg_retrier(db_url: str) -> Iterator[Retrier]:
    """A Retrier on PostgreSQL, in a namespace of its own (its own wake channel and
    announcement lock, so no other worker of the machine's can want for it)."""
    namespace = f"w{uuid.uuid4().hex[:8]}"
    retrier = Retrier(db_url, namespace=namespace, poll_interval=timedelta(minutes=5))
    yield retrier
    retrier.close()


def _libpq(retrier: Retrier) -> str:
    return libpq_dsn(retrier.store.dialect.url)  # type: ignore[attr-defined]


class Channel:
    """A LISTEN connection on the retrier's wake channel."""

    def __init__(self, retrier: Retrier) -> None:
        import psycopg

        self.name: str = retrier.store.dialect.wake_channel  # type: ignore[attr-defined]
        self._conn = psycopg.connect(_libpq(retrier), autocommit=True)
        self._conn.execute(f'LISTEN "{self.name}"')

    def notified(self, within: float) -> bool:
        return any(True for _ in self._conn.notifies(timeout=within, stop_after=1))

    def close(self) -> None:
        self._conn.close()


def _holders(retrier: Retrier, channel: str) -> int:
    """Sessions holding the announcement lock shared."""
    import psycopg

    with psycopg.connect(_libpq(retrier), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND mode = 'ShareLock' AND classid = %s AND objid = hashtext(%s)::oid",
            (LOCK_CLASS, channel),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_insert_notifies_only_while_a_worker_wants_to_hear(pg_retrier: Retrier) -> None:
    @pg_retrier.action(name="work")
    def work() -> None:
        return None

    channel = Channel(pg_retrier)
    try:
        pg_retrier.run(work)  # creates the schema (and its trigger); nobody wants
        assert not channel.notified(within=0.3)
        pg_retrier.run(work)
        assert not channel.notified(within=0.3)

        wanting = threading.Event()
        wants = PgWants(_libpq(pg_retrier), channel.name, wanting.set)
        try:
            assert wanting.wait(5)
            assert _holders(pg_retrier, channel.name) == 1
            pg_retrier.run(work)
            assert channel.notified(within=5)

            wants.want(False)
            _wait_until(lambda: _holders(pg_retrier, channel.name) == 0)
            pg_retrier.run(work)
            assert not channel.notified(within=0.3)

            wanting.clear()
            wants.want(True)
            assert wanting.wait(5)
            pg_retrier.run(work)
            assert channel.notified(within=5)
        finally:
            wants.close()
        assert _holders(pg_retrier, channel.name) == 0
    finally:
        channel.close()


def test_a_worker_that_starts_wanting_waits_for_an_unannounced_insert_to_commit(
    pg_retrier: Retrier,
) -> None:
    """The insert's trigger took the lock (nobody wanted): a worker that wants to hear
    now waits for that transaction, then claims, and finds its run."""
    @pg_retrier.action(name="work")
    def work() -> None:
        return None

    pg_retrier.run(work)  # the schema
    first, _ = pg_retrier.store.claim("w0", 10, 60_000)
    assert len(first) == 1
    channel = Channel(pg_retrier)
    wanting = threading.Event()
    try:
        with pg_retrier.session() as session, session.begin():  # a transaction left open
            run_id = pg_retrier.run(work, session=session)
            wants = PgWants(_libpq(pg_retrier), channel.name, wanting.set)
            try:
                assert not wanting.wait(0.5)  # it waits for this transaction
                claimed, _ = pg_retrier.store.claim("w1", 10, 60_000)
                assert claimed == []  # (not committed yet)
            except BaseException:
                wants.close()
                raise
        try:
            assert wanting.wait(5)
            claimed, _ = pg_retrier.store.claim("w1", 10, 60_000)
            assert [c.id for c in claimed] == [run_id]
            assert not channel.notified(within=0.2)  # it was never announced
        finally:
            wants.close()
    finally:
        channel.close()


def test_a_busy_worker_stops_wanting_and_still_starts_new_runs_at_once(pg_retrier: Retrier) -> None:
    """One long action in flight, short ones recorded beside it: while records come
    every few milliseconds the worker does not want announcements; once they pause it
    wants them again, and a new run starts within moments (the poll is 5 minutes)."""
    release = threading.Event()
    started: dict[str, float] = {}

    @pg_retrier.action(name="long")
    def long() -> None:
        release.wait(30)

    @pg_retrier.action(name="short")
    def short(i: int) -> int:
        started[f"short{i}"] = time.monotonic()
        return i

    channel_name = pg_retrier.store.dialect.wake_channel  # type: ignore[attr-defined]
    with pg_retrier:
        _wait_until(lambda: _holders(pg_retrier, channel_name) == 1)  # idle: it wants
        pg_retrier.run(long)
        ids = [pg_retrier.run(short, {"i": i}) for i in range(50)]
        pg_retrier.wait_all(ids, timeout=30)
        # The records have paused: with the long run in flight and free slots, it
        # wants to hear of new runs again.
        _wait_until(lambda: _holders(pg_retrier, channel_name) == 1)
        enqueued = time.monotonic()
        last = pg_retrier.run(short, {"i": 99})
        pg_retrier.wait(last, timeout=10)
        assert started["short99"] - enqueued < 2.0
        release.set()
    assert _holders(pg_retrier, channel_name) == 0  # a stopped worker holds nothing
