"""The chaos harness's pool check: which spans a lost attempt's slot covers.

A worker SIGKILLed while it holds a run of the capped pool keeps the run's slot until
its lease is reaped. The check extends that attempt's interval to the reaping, and it
must pick the attempt's own interval: an earlier attempt of the same item by the same
worker freed its slot when it failed, and stretching it over the gap that followed
counts a slot another item rightly took in between (a false alarm seen in CI).
"""

from __future__ import annotations

from collections import Counter

from bench.chaos_checks import (
    Attempt,
    Expected,
    Interval,
    PoolRecords,
    Snapshot,
    max_overlap,
    slot_spans,
)

MS = 1_000_000
PID = 4242


def snapshot(attempts: dict[str, list[Attempt]]) -> Snapshot:
    return Snapshot(
        runs={}, attempts=attempts, completions=Counter(), duplicates=[], effects={},
        workflows={}, workflow_errors={}, journal={},
    )


def records(*intervals: Interval) -> PoolRecords:
    return PoolRecords(list(intervals), {}, {}, [])


def test_a_lost_attempt_killed_before_its_action_holds_its_slot_from_its_claim() -> None:
    # Item 1 failed once in PID (0-10 ms), was claimed again by PID at 40 ms, and PID
    # died before the action began; the lease was reaped at 100 ms. Item 2 ran in the
    # gap (15-35 ms) on the slot item 1's failure freed.
    expected = Expected(items={"w1": 1, "w2": 2})
    snap = snapshot({"w1": [
        Attempt("w1", "failed", PID, 0, 10),
        Attempt("w1", "lost", PID, 40, 100),
    ]})
    recs = records(
        Interval(1, PID, 0, 10 * MS, True),
        Interval(2, 7, 15 * MS, 35 * MS, True),
    )
    spans = sorted(slot_spans(recs, snap, expected))
    assert spans == [(0, 10 * MS), (15 * MS, 35 * MS), (41 * MS, 100 * MS)]
    assert max_overlap(spans) == 1  # the earlier interval is not stretched over item 2's


def test_a_lost_attempt_killed_mid_action_extends_its_own_interval_to_the_reaping() -> None:
    expected = Expected(items={"w1": 1})
    snap = snapshot({"w1": [
        Attempt("w1", "failed", PID, 0, 10),
        Attempt("w1", "lost", PID, 40, 100),
    ]})
    recs = records(
        Interval(1, PID, 0, 10 * MS, True),
        Interval(1, PID, 40 * MS + 300, 60 * MS, False),  # seen dead at 60 ms
    )
    assert sorted(slot_spans(recs, snap, expected)) == [(0, 10 * MS), (40 * MS + 300, 100 * MS)]


def test_slots_held_past_the_cap_by_lost_attempts_are_counted() -> None:
    # Three items run 50-90 ms while two lost attempts still hold slots to 100 ms:
    # the cap of 3 was broken, by a slot with no action (killed before it began) and
    # by one whose action was killed at 45 ms.
    expected = Expected(items={"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    snap = snapshot({
        "d": [Attempt("d", "lost", PID, 20, 100)],
        "e": [Attempt("e", "lost", PID + 1, 20, 100)],
    })
    recs = records(
        Interval(1, 1, 50 * MS, 90 * MS, True),
        Interval(2, 2, 50 * MS, 90 * MS, True),
        Interval(3, 3, 50 * MS, 90 * MS, True),
        Interval(5, PID + 1, 21 * MS, 45 * MS, False),
    )
    assert max_overlap(slot_spans(recs, snap, expected)) == 5
