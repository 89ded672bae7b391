"""A record that frees a pool's slot without taking it again wakes other workers only
when a run of that pool is waiting for it (`Records.record_in`'s `_waiting_in`):
another worker may be idle beside a full pool, and nothing else would tell it. In a
pool group, a slot one pool frees is the group's too: a run waiting in a sibling pool
is worth the wake-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from retrier import FakeClock, Retrier
from retrier.engine import Outcome
from workpool import PoolGroup, Workpool

MakeRetrier = Callable[..., Retrier]


def _success(claimed: Any) -> Outcome:
    return Outcome(
        claimed.id, claimed.fence, "success", claimed.started_ms, result=None,
        attempt=claimed.attempts, queue=claimed.queue, fn=claimed.fn,
    )


def _wakes_after_freeing_a_slot(
    retrier: Retrier, first: Workpool, second: Workpool, waiting: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """One item in `first` (and, if `waiting`, one in `second`, held back by the cap
    they share), one claimed and its success recorded: the wake-ups the record sent."""

    @retrier.action(name="work")
    def work(n: int) -> int:
        return n

    first.enqueue(work, {"n": 1})
    if waiting:
        second.enqueue(work, {"n": 2})
    claimed, _ = retrier.store.claim("w1", 10, 60_000)
    assert len(claimed) == 1  # the cap's one slot, whichever item took it

    sent: list[str] = []
    dialect = retrier.store.dialect
    monkeypatch.setattr(dialect, "can_notify", True)
    monkeypatch.setattr(dialect, "notify", lambda _conn, kind, payload="": sent.append(kind))
    # The store's record claims nothing (claim_limit 0): the freed slot stays free.
    retrier.store.record([_success(claimed[0])], "w1", 60_000)
    return sent


@pytest.mark.parametrize("waiting", [True, False], ids=["a run waits", "nothing waits"])
@pytest.mark.parametrize("grouped", [False, True], ids=["one pool", "a sibling in its group"])
def test_a_freed_slot_wakes_others_only_for_a_run_waiting_for_it(
    make_retrier: MakeRetrier, monkeypatch: pytest.MonkeyPatch, waiting: bool, grouped: bool
) -> None:
    retrier = make_retrier(clock=FakeClock())
    if grouped:  # the waiting run is in the other pool of the group
        gpu = PoolGroup(retrier, "gpu", max_parallelism=1)
        first = Workpool(retrier, "train", max_parallelism=1, group=gpu)
        second = Workpool(retrier, "infer", max_parallelism=1, group=gpu)
    else:
        first = second = Workpool(retrier, "capped", max_parallelism=1)

    sent = _wakes_after_freeing_a_slot(retrier, first, second, waiting, monkeypatch)

    assert sent == (["wake"] if waiting else [])
