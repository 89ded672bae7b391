"""Plain successes (runs without an on_complete) are recorded in one batch without
reading their rows: an executemany on SQLite, one statement with the attempts' rows on
PostgreSQL. Those the batch cannot complete (a lost lease, a cancel request) go the
general way, in the same transaction, with the same result on both databases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from retrier import FakeClock, Retrier
from retrier._tables import attempts_t
from retrier.engine import Outcome

MakeRetrier = Callable[..., Retrier]


def test_a_batch_completes_what_it_can_and_leaves_the_rest_to_the_general_record(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action(name="work")
    def work(n: int) -> Any: ...

    ids = [retrier.run(work, {"n": n}) for n in range(4)]
    claimed, _ = retrier.store.claim("w1", 10, 60_000)
    assert sorted(c.id for c in claimed) == sorted(ids)
    by_id = {c.id: c for c in claimed}
    canceled, stale = ids[2], ids[3]
    retrier.cancel(canceled)  # running: the batch must not complete it
    clock.advance(0.25)
    results = {ids[0]: {"nested": [1, "two", None], "nul": "a\x00b"}, ids[1]: None,
               canceled: 3, stale: 4}
    outcomes = [
        Outcome(
            run_id, by_id[run_id].fence + (1 if run_id == stale else 0), "success",
            by_id[run_id].started_ms, result=results[run_id], attempt=by_id[run_id].attempts,
            queue=by_id[run_id].queue, plain=True, fn="work",
        )
        for run_id in ids
    ]
    recorded = retrier.store.record(outcomes, "w1", 60_000)

    assert sorted(recorded.completed) == sorted(ids[:3])
    assert recorded.stale == [stale]
    for run_id in ids[:2]:
        run = retrier.store.get(run_id)
        assert (run.state, run.outcome, run.result) == ("completed", "success", results[run_id])
        assert run.finished_ms == clock.now_ms() and run.lease_owner is None
    # The batch left the cancel request to the general record, which honours it.
    run = retrier.store.get(canceled)
    assert (run.state, run.outcome, run.result) == ("completed", "canceled", None)
    assert retrier.store.get(stale).state == "running"  # its holder's lease decides
    with retrier.store.dialect.read() as conn:
        attempts = conn.execute(
            select(attempts_t.c.run_id, attempts_t.c.number, attempts_t.c.worker,
                   attempts_t.c.outcome, attempts_t.c.started_ms, attempts_t.c.finished_ms)
        ).all()
    started = by_id[ids[0]].started_ms
    assert sorted(attempts) == sorted(
        [(run_id, 1, "w1", "success", started, clock.now_ms()) for run_id in ids[:2]]
        + [(canceled, 1, "w1", "canceled", started, clock.now_ms())]
    )
