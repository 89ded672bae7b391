"""`PoolGroup`: a cap shared by several pools, each with a guaranteed minimum,
borrowing the slots the others leave idle. Stored as data (`tiers_queue_groups`) and
enforced by the engine's claim, like every pool limit."""

from __future__ import annotations

import anyio

from retrier import Retrier
from retrier.engine import QueueGroup, check_name

from ._settings import check_parallelism


class PoolGroup:
    """At most `max_parallelism` items of its member pools run at once, across every
    process; each member is guaranteed its `guaranteed=` slots of that cap, and may
    borrow the slots other members leave idle.

    >>> gpu = PoolGroup(retrier, "gpu", max_parallelism=10)
    >>> train = Workpool(retrier, "train", max_parallelism=8, group=gpu, guaranteed=3)
    >>> infer = Workpool(retrier, "infer", max_parallelism=10, group=gpu, guaranteed=5)

    The rule, at every claim: a member starts an item while the group runs fewer than
    `max_parallelism`, the member fewer than its own cap, and either the member runs
    fewer than its guarantee, or the group's free slots exceed the unmet guarantees
    (guaranteed less running, at most their due items) of the other members with due
    items. An idle member's slots are lent; they come back as borrowed items finish
    (running items are never stopped).

    Constructing it stores the cap if it differs (the last writer wins; workers apply
    it at their next claim). The members' guarantees never add up to more than the
    cap: a change that would make them is refused with `InvalidSettings`, and nothing
    is written.
    """

    def __init__(self, retrier: Retrier, name: str, *, max_parallelism: int) -> None:
        check_name(name, "a pool group's name")
        check_parallelism(max_parallelism)
        self.retrier = retrier
        self.name = name
        self._cap = max_parallelism
        stored = retrier.store.get_group(name)
        if stored is None or stored.max_parallelism != max_parallelism:
            self._store(max_parallelism)

    @property
    def max_parallelism(self) -> int:
        """The cap this object last wrote (another process may have changed it since)."""
        return self._cap

    def set_max_parallelism(self, max_parallelism: int) -> None:
        """Change the group's cap for every worker, at their next claim. Lowering it
        never stops running items. Raises `InvalidSettings` (writing nothing) below
        the sum of the members' guarantees."""
        check_parallelism(max_parallelism)
        self._store(max_parallelism)

    def status(self) -> QueueGroup:
        """The group as stored now: its cap, and each member's guarantee, own cap
        and running items."""
        group = self.retrier.store.get_group(self.name)
        return group if group is not None else QueueGroup(self.name, self._cap)

    async def set_max_parallelism_async(self, max_parallelism: int) -> None:
        await anyio.to_thread.run_sync(self.set_max_parallelism, max_parallelism)

    async def status_async(self) -> QueueGroup:
        return await anyio.to_thread.run_sync(self.status)

    def _store(self, max_parallelism: int) -> None:
        self.retrier.store.set_group(self.name, max_parallelism)
        self._cap = max_parallelism
        self.retrier.wake_workers()

    def __repr__(self) -> str:
        return f"PoolGroup({self.name!r}, max_parallelism={self._cap})"
