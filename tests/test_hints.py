"""When a worker wants to hear of new runs (`_hints.wants_announcements`): the policy
behind PostgreSQL's announcement lock (`tests/test_announcement_wants.py` checks the
lock itself)."""

from __future__ import annotations

import pytest

from retrier._hints import CYCLING_S, wants_announcements


def test_an_idle_worker_wants_to_hear_of_new_runs() -> None:
    assert wants_announcements(0, 16, False, since_record=0.0) == (True, None)
    assert wants_announcements(0, 16, False, since_record=60.0) == (True, None)


def test_a_worker_that_records_every_few_milliseconds_does_not_and_asks_again_after() -> None:
    wanted, ask_again = wants_announcements(3, 16, False, since_record=0.001)
    assert not wanted
    assert ask_again == pytest.approx(CYCLING_S - 0.001)


def test_a_worker_whose_records_paused_wants_to_hear_again() -> None:
    # (a long action in flight: no record is coming soon to claim new runs)
    assert wants_announcements(3, 16, False, since_record=CYCLING_S) == (True, None)


def test_a_worker_that_cannot_take_more_runs_does_not() -> None:
    assert wants_announcements(16, 16, False, since_record=60.0) == (False, None)
    assert wants_announcements(16, 16, False, since_record=0.0) == (False, None)
    assert wants_announcements(0, 16, True, since_record=60.0) == (False, None)
