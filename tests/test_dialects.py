"""The Dialect contract, checked against each dialect: what the store relies on from
SQLite and PostgreSQL alike. A new backend passes these before anything else."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial

import anyio
import pytest
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from retrier._dialects import CANCEL, WAKE, Dialect, is_transient, open_dialect
from retrier._errors import DatabaseBusy
from retrier._sqlite import WriterTurns
from retrier._waiting import loop_caller

metadata = MetaData()
items = Table(
    "conformance_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("label", String(40), nullable=False),
)


@pytest.fixture
def dialect(db_url: str) -> Iterator[Dialect]:
    opened = open_dialect(db_url)
    with opened.write() as conn:
        metadata.create_all(conn)
        conn.execute(insert(items), [{"id": i, "label": f"item {i}"} for i in range(5)])
    yield opened
    assert opened.checked_out() == 0, "a connection was left checked out"
    opened.dispose()


def labels(dialect: Dialect) -> list[str]:
    with dialect.read() as conn:
        return list(conn.execute(select(items.c.label).order_by(items.c.id)).scalars())


def test_writes_commit_and_a_failed_write_rolls_back(dialect: Dialect) -> None:
    with dialect.write() as conn:
        conn.execute(update(items).where(items.c.id == 0).values(label="changed"))
    with pytest.raises(IntegrityError), dialect.write() as conn:
        conn.execute(update(items).where(items.c.id == 1).values(label="lost"))
        conn.execute(insert(items).values(id=2, label="duplicate key"))
    with dialect.write_internal() as conn:
        conn.execute(update(items).where(items.c.id == 3).values(label="internal"))
    with dialect.write_one() as conn:
        conn.execute(update(items).where(items.c.id == 4).values(label="one statement"))
    assert labels(dialect) == ["changed", "item 1", "item 2", "internal", "one statement"]


def test_the_capabilities_it_claims_are_real(dialect: Dialect) -> None:
    assert timedelta(0) < dialect.default_poll_interval <= timedelta(seconds=5)
    if dialect.update_returning:
        with dialect.write() as conn:
            row = conn.execute(
                update(items).where(items.c.id == 0).values(label="x").returning(items.c.id)
            ).first()
        assert row is not None and row.id == 0
    if dialect.batch_rowcount:
        with dialect.write() as conn:
            changed = conn.execute(
                update(items).where(items.c.id == 1).values(label="y"), [{}, {}]
            ).rowcount
        assert changed == 2


def test_a_claim_lock_skips_rows_another_claim_holds(dialect: Dialect) -> None:
    """On a server with row locks, a second claim skips the rows a first one holds; a
    backend whose writers are serialized runs the second after the first instead.
    Either way no row is taken twice."""
    claim = dialect.lock_for_claim(select(items.c.id).order_by(items.c.id).limit(2))
    first_holds, second_done = threading.Event(), threading.Event()
    taken: dict[str, list[int]] = {}

    def first() -> None:
        with dialect.write() as conn:
            taken["first"] = list(conn.execute(claim).scalars())
            conn.execute(update(items).where(items.c.id.in_(taken["first"])).values(label="a"))
            first_holds.set()
            taken["overlap"] = [int(second_done.wait(2))]

    def second() -> None:
        assert first_holds.wait(10)
        with dialect.write() as conn:
            unclaimed = dialect.lock_for_claim(
                select(items.c.id).where(items.c.label.like("item%")).order_by(items.c.id).limit(2)
            )
            taken["second"] = list(conn.execute(unclaimed).scalars())
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert taken["first"] == [0, 1] and taken["second"] == [2, 3]
    # PostgreSQL skips the locked rows without waiting; SQLite runs writers one by one.
    assert taken["overlap"] == [1 if dialect.name == "postgresql" else 0]


def test_an_insert_ignoring_skips_rows_a_unique_index_holds(dialect: Dialect) -> None:
    stmt = dialect.insert_ignoring(items).returning(items.c.id)
    with dialect.write() as conn:
        assert conn.execute(stmt, {"id": 1, "label": "taken"}).first() is None
        assert conn.execute(stmt, {"id": 9, "label": "new"}).first() == (9,)
        both = [{"id": 2, "label": "x"}, {"id": 10, "label": "y"}]
        conn.execute(dialect.insert_ignoring(items), both)
    assert labels(dialect) == [f"item {i}" for i in range(5)] + ["new", "y"]


def test_a_key_lock_serializes_transactions(dialect: Dialect) -> None:
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with dialect.write() as conn:
            dialect.lock_key(conn, "conformance")
            first_in.set()
            time.sleep(0.2)
            order.append("first done")

    def second() -> None:
        assert first_in.wait(10)
        with dialect.write() as conn:
            dialect.lock_key(conn, "conformance")
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert order == ["first done", "second in"]


def test_notifications_reach_a_listener_or_are_declared_absent(
    dialect: Dialect, db_url: str
) -> None:
    """A hint sent by another process (here: another dialect on the same database)
    reaches a listener; a listener says when it is listening (WAKE with no payload)."""
    heard: list[tuple[str, str]] = []

    async def main() -> None:
        listening = anyio.Event()
        got = anyio.Event()
        call_soon = loop_caller()

        def on_notify(kind: str, payload: str) -> None:  # on the loop or a thread
            heard.append((kind, payload))
            call_soon((got if payload == "a run id" else listening).set)

        async with anyio.create_task_group() as tg:
            await tg.start(partial(dialect.listen, on_notify))
            if not dialect.can_notify:
                with dialect.write() as conn:
                    dialect.notify(conn, WAKE)  # a no-op, not an error
                tg.cancel_scope.cancel()
                return
            with anyio.fail_after(10):
                await listening.wait()
            assert (WAKE, "") in heard
            sender = open_dialect(db_url)
            try:
                with sender.write() as conn:
                    sender.notify(conn, CANCEL, "a run id")
                with anyio.fail_after(10):
                    await got.wait()
            finally:
                sender.dispose()
            tg.cancel_scope.cancel()

    anyio.run(main)
    if dialect.can_notify:
        assert (CANCEL, "a run id") in heard


def test_a_blocking_call_runs_from_async_code(dialect: Dialect) -> None:
    def count() -> int:
        with dialect.read() as conn:
            return len(list(conn.execute(select(items.c.id))))

    async def main() -> int:
        return await dialect.call(count)

    assert anyio.run(main) == 5


def test_store_calls_made_together_commit_or_undo_only_their_own_writes(
    dialect: Dialect,
) -> None:
    # On SQLite they share one transaction (a group commit), each in a savepoint.
    def relabel(item: int, label: str) -> str:
        with dialect.write_internal() as conn:
            conn.execute(update(items).where(items.c.id == item).values(label=label))
        with dialect.read() as conn:  # its own write, seen before the commit
            return str(conn.execute(select(items.c.label).where(items.c.id == item)).scalar())

    def clash() -> None:
        with dialect.write() as conn:
            conn.execute(update(items).where(items.c.id == 1).values(label="lost"))
            conn.execute(insert(items).values(id=2, label="duplicate key"))

    async def main() -> dict[str, object]:
        ended: dict[str, object] = {}

        async def run(name: str, fn: Callable[[], object]) -> None:
            try:
                ended[name] = await dialect.call(fn)
            except IntegrityError as exc:
                ended[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "first", partial(relabel, 0, "first"))
            tg.start_soon(run, "clash", clash)
            tg.start_soon(run, "last", partial(relabel, 4, "last"))
        return ended

    ended = anyio.run(main)
    assert ended["first"] == "first" and ended["last"] == "last"
    assert isinstance(ended["clash"], IntegrityError)
    assert labels(dialect) == ["first", "item 1", "item 2", "item 3", "last"]


def test_sqlite_store_calls_made_together_share_one_commit(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's store calls each run on a thread of their own")
    dialect = open_dialect(db_url)
    with dialect.write() as conn:
        metadata.create_all(conn)
    commits: list[object] = []
    listener = partial(lambda seen, conn: seen.append(conn), commits)
    event.listen(Engine, "commit", listener)

    def add(item: int) -> None:
        with dialect.write_internal() as conn:
            conn.execute(insert(items).values(id=item, label=f"item {item}"))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for item in range(20):
                tg.start_soon(dialect.call, partial(add, item))

    try:
        anyio.run(main)
    finally:
        event.remove(Engine, "commit", listener)
    try:
        assert len(labels(dialect)) == 20
        # The first ran at once, alone (the loop had been quiet); the nineteen others
        # shared one BEGIN ... COMMIT.
        assert len(commits) == 2
    finally:
        dialect.dispose()


def test_a_thread_waiting_to_write_goes_before_the_loops_next_try() -> None:
    # An app's write from its own thread is not starved by an in-process worker
    # whose event loop writes back to back (it only ever tries the lock).
    turns = WriterTurns(timeout=5.0)
    assert turns.acquire(blocking=False)  # the loop holds it
    waited: list[bool] = []
    thread = threading.Thread(target=lambda: waited.append(turns.acquire(blocking=True)))
    thread.start()
    deadline = time.monotonic() + 5
    while turns.acquire(blocking=False):  # reentrant until the thread waits
        turns.release()
        assert time.monotonic() < deadline, "the thread never waited"
        time.sleep(0.001)
    turns.release()
    thread.join(5)
    assert waited == [True]
    assert not turns.acquire(blocking=False)  # the thread holds it now


def test_a_thread_that_waits_too_long_to_write_is_told_the_database_is_locked() -> None:
    turns = WriterTurns(timeout=0.05)
    assert turns.acquire(blocking=False)
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            turns.acquire(blocking=True)
        except sqlite3.OperationalError as exc:
            failed.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(5)
    turns.release()
    assert [str(e) for e in failed] == ["database is locked"]
    assert turns.acquire(blocking=False)  # nobody waits any more


def test_transient_errors_are_told_from_bugs() -> None:
    blip = OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    assert is_transient(blip)
    assert not is_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_transient(ValueError("a bug"))
    import sqlite3

    locked = OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked"))
    assert is_transient(locked)
    wrong = OperationalError("SELECT x", {}, sqlite3.OperationalError("no such column: x"))
    assert not is_transient(wrong), "a schema not migrated is not waited out"


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_durability_sets_how_commits_reach_the_disk(db_url: str, durability: str) -> None:
    opened = open_dialect(db_url, durability=durability)  # type: ignore[arg-type]
    try:
        if opened.name == "sqlite":
            with opened.write_internal() as conn:
                level = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            assert level == {"full": 2, "normal": 1}[durability]
        else:
            with opened.write_internal() as conn:
                internal = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
            with opened.write() as conn:
                app = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
            assert (internal, app) == ({"full": "on", "normal": "off"}[durability], "on")
    finally:
        opened.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_engines_own_sessions_plan_lookups_by_index_at_any_table_size(
    dialect: Dialect,
) -> None:
    """A statement prepared while its table is small keeps its generic plan for the
    session. On the engine's own sessions that plan finds rows by index; on an
    ordinary session (the control) the same plan scans the whole table, however
    large it grows until an ANALYZE."""

    def generic_plan(conn: Connection) -> str:
        conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(
            "PREPARE by_ids(int[]) AS UPDATE conformance_items SET label = label"
            " FROM unnest($1) AS b(id) WHERE conformance_items.id = b.id"
        )
        try:
            return "\n".join(
                conn.exec_driver_sql("EXPLAIN EXECUTE by_ids('{1,2}')").scalars()
            )
        finally:
            conn.exec_driver_sql("DEALLOCATE by_ids")

    with dialect.write_internal() as conn:
        internal = generic_plan(conn)
    with dialect.write() as conn:
        ordinary = generic_plan(conn)
    assert "Seq Scan" in ordinary, ordinary
    assert "Seq Scan" not in internal and "Index" in internal, internal


def test_an_unknown_durability_is_refused(db_url: str) -> None:
    from retrier import InvalidSettings

    with pytest.raises(InvalidSettings, match="durability"):
        open_dialect(db_url, durability="fsync")  # type: ignore[arg-type]


def test_topic_notices_arrive_at_commit_and_never_after_a_rollback(dialect: Dialect) -> None:
    from sqlalchemy import literal

    got: list[str] = []
    arrived = threading.Event()

    def collect(payload: str) -> None:
        got.append(payload)
        arrived.set()

    notice = dialect.topic_notice("contract", literal("hello"))
    subscription = dialect.subscribe("contract", collect)
    try:
        if not dialect.topics_notify:
            assert notice is None and not arrived.wait(0.3)
            return
        assert notice is not None
        assert arrived.wait(5) and got == [""]  # listening
        arrived.clear()
        with pytest.raises(RuntimeError), dialect.write() as conn:
            conn.execute(select(dialect.topic_notice("contract", literal("rolled back"))))
            raise RuntimeError("roll back")
        with dialect.write() as conn:
            conn.execute(select(notice))
            assert not arrived.wait(0.3), "sent before the commit"
        assert arrived.wait(5) and got == ["", "hello"]
        arrived.clear()
        unrelated = dialect.topic_notice("other", literal("elsewhere"))
        with dialect.write() as conn:
            conn.execute(select(unrelated))
        assert not arrived.wait(0.5) and got == ["", "hello"]
    finally:
        subscription.close()


def test_sqlite_writes_wait_for_another_connections_lock_at_begin_on_our_schedule(
    tmp_path: object,
) -> None:
    """The engine's own connections have SQLite's busy handler off for good (a
    transaction holding the write lock waits for nothing else in WAL mode); an
    app's keep it for their statements. Both wait at BEGIN, by retrying, for a lock
    another connection holds, up to the URL's timeout."""
    path = f"{tmp_path}/x.db"
    dialect = open_dialect(f"sqlite:///{path}?timeout=2")
    try:
        with dialect.write() as conn:
            metadata.create_all(conn)
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2000
        with dialect.write_internal() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 0
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for write in (dialect.write, dialect.write_internal):
            other.execute("BEGIN IMMEDIATE")
            timer = threading.Timer(0.15, lambda: other.execute("COMMIT"))
            timer.start()
            began = time.monotonic()
            with write() as conn:
                conn.execute(insert(items), {"id": int(began * 1e6) % 10**9, "label": "x"})
            assert time.monotonic() - began >= 0.1, "it waited for the other's commit"
            timer.join()
        other.close()
    finally:
        dialect.dispose()
    short = open_dialect(f"sqlite:///{path}?timeout=0.05")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for write in (short.write, short.write_internal):
            with pytest.raises((sqlite3.OperationalError, DatabaseBusy), match="locked"), write():
                pass
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        short.dispose()
