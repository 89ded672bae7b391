"""`CompiledQuery` (retrier/_compiled.py) returns what SQLAlchemy returns for the same
statement and parameters: lists of every size (empty included), constants the
statement holds, values decoded by their columns' types, a changed-row count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import bindparam, select, update

from retrier import Retrier
from retrier._claims import _DUE_CANDIDATES, _NEXT_DUE_AFTER, _START_RUNS
from retrier._compiled import CompiledQuery
from retrier._tables import runs

MakeRetrier = Callable[..., Retrier]


@pytest.fixture
def stored(make_retrier: MakeRetrier) -> Retrier:
    retrier = make_retrier()

    @retrier.action
    def first(n: int, note: dict[str, Any]) -> None: ...

    @retrier.action
    def second(n: int) -> None: ...

    for n in range(6):
        retrier.run(first, {"n": n, "note": {"n": n, "nested": [n, "x"]}})
        retrier.run(second, {"n": n})
    return retrier


@pytest.mark.parametrize(
    "can_run",
    [
        {"any_fn": True, "fns": [], "handlers": []},
        {"any_fn": False, "fns": ["first"], "handlers": []},
        {"any_fn": False, "fns": ["first", "second"], "handlers": ["h1", "h2", "h3"]},
        {"any_fn": False, "fns": [], "handlers": []},
    ],
)
def test_rows_are_sqlalchemys_rows(stored: Retrier, can_run: dict[str, Any]) -> None:
    sa_dialect = stored.store.engine.dialect
    due = CompiledQuery(_DUE_CANDIDATES, sa_dialect)
    next_due = CompiledQuery(_NEXT_DUE_AFTER, sa_dialect)
    now = stored.store.clock.now_ms()
    for limit in (1, 5, 50):
        params = {"now": now, "limit": limit, **can_run}
        with stored.store.dialect.read() as conn:
            expected = [tuple(r) for r in conn.execute(_DUE_CANDIDATES, params)]
            got = due.rows(conn, params)
            expected_next = conn.execute(_NEXT_DUE_AFTER, {"now": now - 60_000, **can_run})
            got_next = next_due.rows(conn, {"now": now - 60_000, **can_run})
        assert [tuple(r) for r in got] == expected
        assert got_next[0][0] == expected_next.scalar()
        if got:
            assert isinstance(got[0].args, dict), "JSON decoded as SQLAlchemy decodes it"
            assert got[0].id == expected[0][2]


def test_an_update_with_a_list_counts_the_rows_it_changed(stored: Retrier) -> None:
    sa_dialect = stored.store.engine.dialect
    start = CompiledQuery(_START_RUNS, sa_dialect)
    with stored.store.dialect.read() as conn:
        ids = [r.id for r in conn.execute(select(runs.c.id).order_by(runs.c.id))]
    with stored.store.dialect.write() as conn:
        lease = {"worker": "w", "until": 10, "now": 5}
        assert start.execute(conn, {"ids": ids[:3], **lease}) == 3
        assert start.execute(conn, {"ids": ids[3:4], **lease}) == 1
        assert start.execute(conn, {"ids": [], **lease}) == 0
        assert start.execute(conn, {"ids": [*ids[:2], "no-such-run"], **lease}) == 2
    with stored.store.dialect.read() as conn:
        rows = conn.execute(select(runs.c.id, runs.c.state, runs.c.fence).order_by(runs.c.id))
        by_id = {r.id: (r.state, r.fence) for r in rows}
    assert [by_id[i] for i in ids[:4]] == [
        ("running", 2), ("running", 2), ("running", 1), ("running", 1)
    ]
    assert {by_id[i] for i in ids[4:]} == {("pending", 0)}


def test_a_statements_own_values_are_kept(stored: Retrier) -> None:
    sa_dialect = stored.store.engine.dialect
    stmt = update(runs).where(runs.c.id.in_(bindparam("ids", expanding=True))).values(
        error="set by the statement", failures=bindparam("failures")
    )
    with stored.store.dialect.read() as conn:
        one = conn.execute(select(runs.c.id).limit(1)).scalar_one()
    with stored.store.dialect.write() as conn:
        assert CompiledQuery(stmt, sa_dialect).execute(conn, {"ids": [one], "failures": 3}) == 1
    row = stored.store.get(one)
    assert (row.error, row.failures) == ("set by the statement", 3)


def test_an_update_returning_without_lists_encodes_and_decodes_json(stored: Retrier) -> None:
    """No list to expand: the bind processors are the statement's own (a JSON value is
    encoded), and RETURNING's rows are decoded by their columns' types."""
    sa_dialect = stored.store.engine.dialect
    stmt = (
        update(runs)
        .where(runs.c.id == bindparam("b_id"))
        .values(result=bindparam("b_result"))
        .returning(runs.c.id, runs.c.result, runs.c.args)
    )
    with stored.store.dialect.read() as conn:
        one = conn.execute(select(runs.c.id).where(runs.c.fn == "first").limit(1)).scalar_one()
    value = {"list": [1, "two"], "nested": {"n": None}}
    with stored.store.dialect.write() as conn:
        got = CompiledQuery(stmt, sa_dialect).rows(conn, {"b_id": one, "b_result": value})
        missing = CompiledQuery(stmt, sa_dialect).rows(conn, {"b_id": "none", "b_result": 1})
    assert [(r.id, r.result) for r in got] == [(one, value)]
    assert isinstance(got[0].args, dict) and missing == []
    assert stored.store.get(one).result == value
