"""`all_reached`, behind every wait for many runs or workflows: it removes what has
reached a final state, reads a few rows per look while the first ids are still going,
and reads everything left, in growing slices, once they are not."""

from __future__ import annotations

import pytest

from retrier import RunNotFound
from retrier.engine import all_reached


class _States:
    def __init__(self, states: dict[str, str]) -> None:
        self.states = states
        self.reads: list[int] = []

    def __call__(self, ids: list[str]) -> dict[str, str]:
        self.reads.append(len(ids))
        return {i: self.states[i] for i in ids if i in self.states}


def test_a_look_reads_a_few_rows_while_the_first_ids_are_going() -> None:
    states = _States({f"{n:03}": "running" for n in range(300)})
    remaining = set(states.states)
    assert all_reached(remaining, states, {"completed"}, RunNotFound) is None
    assert states.reads == [8] and len(remaining) == 300


def test_done_ids_are_removed_and_slices_grow_to_the_end() -> None:
    states = _States({f"{n:03}": "completed" for n in range(300)})
    states.states["250"] = "running"
    remaining = set(states.states)
    assert all_reached(remaining, states, {"completed"}, RunNotFound) is None
    # 000-247 in slices of 8 to 128, then the 52 left (at most 200 at a time).
    assert states.reads == [8, 16, 32, 64, 128, 52]
    assert remaining == {"250"}
    states.reads.clear()
    states.states["250"] = "completed"
    assert all_reached(remaining, states, {"completed"}, RunNotFound) is True
    assert states.reads == [1] and remaining == set()


def test_a_slice_is_never_more_than_the_last_size() -> None:
    states = _States({f"{n:04}": "completed" for n in range(1000)})
    assert all_reached(set(states.states), states, {"completed"}, RunNotFound) is True
    assert states.reads == [8, 16, 32, 64, 128, 200, 200, 200, 152]


def test_an_unknown_id_raises() -> None:
    states = _States({"a": "completed"})
    with pytest.raises(RunNotFound):
        all_reached({"a", "b"}, states, {"completed"}, RunNotFound)
