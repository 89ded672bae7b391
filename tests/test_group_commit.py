"""GroupCommit's scheduling, with a fake database: which calls run alone, which share a
group, what each caller gets back, and what a group that cannot commit returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from retrier._group_commit import _QUIET_PASSES, Ended, GroupCommit, failed_all


class FakeDatabase:
    """Records the transactions it ran; `locked_tries` tries find it locked first."""

    def __init__(self, locked_tries: int = 0) -> None:
        self.transactions: list[list[Any]] = []
        self.locked_tries = locked_tries

    def run_group(self, calls: list[Callable[[], Any]], *, wait: bool) -> list[Ended] | None:
        if self.locked_tries and not wait:
            self.locked_tries -= 1
            return None
        ended = []
        for call in calls:
            try:
                ended.append(Ended(value=call()))
            except Exception as exc:
                ended.append(Ended(error=exc))
        self.transactions.append([e.value for e in ended])
        return ended

    def run_alone(self, call: Callable[[], Any]) -> Ended | None:
        if self.locked_tries:
            self.locked_tries -= 1
            return None
        value = call()
        self.transactions.append([value])
        return Ended(value=value)


def groups(db: FakeDatabase) -> GroupCommit:
    return GroupCommit(db.run_group, db.run_alone)


def test_calls_made_in_one_pass_share_a_transaction_after_the_first() -> None:
    db = FakeDatabase()

    async def main() -> list[Any]:
        commit = groups(db)
        return list(await asyncio.gather(*(commit.call(lambda i=i: i) for i in range(5))))

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    assert db.transactions == [[0], [1, 2, 3, 4]]


def test_a_busy_loop_groups_even_a_lone_call_until_it_has_been_quiet() -> None:
    db = FakeDatabase()

    async def waited_for_a_pass(commit: GroupCommit) -> bool:
        """Whether the call ran only after a pass of the loop (in a group)."""
        passed: list[bool] = []
        asyncio.get_running_loop().call_soon(passed.append, True)
        return bool(await commit.call(lambda: bool(passed)))

    async def main() -> list[bool]:
        commit = groups(db)
        first = await waited_for_a_pass(commit)
        await asyncio.gather(commit.call(lambda: "a"), commit.call(lambda: "b"))
        return [first] + [await waited_for_a_pass(commit) for _ in range(_QUIET_PASSES + 2)]

    waited = asyncio.run(main())
    assert waited[0] is False  # a quiet loop: at once
    # After a pass that brought two calls: in a group, until enough quiet passes.
    assert waited[1:] == [True] * _QUIET_PASSES + [False, False]


def test_each_caller_gets_its_own_value_or_error() -> None:
    db = FakeDatabase()

    def fail() -> None:
        raise ValueError("this call only")

    async def main() -> list[Any]:
        commit = groups(db)
        return list(
            await asyncio.gather(
                commit.call(lambda: "first"),
                commit.call(fail),
                commit.call(lambda: "third"),
                return_exceptions=True,
            )
        )

    first, failed, third = asyncio.run(main())
    assert (first, third) == ("first", "third")
    assert isinstance(failed, ValueError) and str(failed) == "this call only"


def test_calls_that_find_the_database_locked_run_once_it_is_free() -> None:
    db = FakeDatabase(locked_tries=5)

    async def main() -> list[Any]:
        commit = groups(db)
        return list(await asyncio.gather(*(commit.call(lambda i=i: i) for i in range(3))))

    assert asyncio.run(main()) == [0, 1, 2]
    assert sorted(v for t in db.transactions for v in t) == [0, 1, 2]


def test_a_group_that_did_not_commit_fails_every_call() -> None:
    lost = OSError("disk I/O error")
    ended = [Ended(value=1), Ended(error=KeyError("own")), Ended(value=3)]
    errors = [e.error for e in failed_all(ended, 3, lost)]
    assert errors[0] is lost and errors[2] is lost
    assert isinstance(errors[1], KeyError)  # its own error stands
    assert [e.error for e in failed_all(None, 2, lost)] == [lost, lost]
    with pytest.raises(OSError):
        failed_all(None, 1, lost)[0].unwrap()
