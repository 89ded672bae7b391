"""durable-tiers, tier 2: a pool of work with a global cap on parallelism.

>>> from workpool import Workpool, RetryBehavior
>>> pool = Workpool(retrier, "emails", max_parallelism=10)
>>> work_id = pool.enqueue(send_email, {"to": "a@b.c"}, retry=True)

A pool is a queue of the retrier's engine whose limits (cap, rate limit, per-key
limit) are stored in the database and enforced when workers claim work.
"""

from __future__ import annotations

from retrier import Debounce

from ._behavior import RetryBehavior
from ._errors import InvalidBatchItem, NotInPool, PoolGroupNotFound, PoolNotFound
from ._group import PoolGroup
from ._pool import BatchItem, Workpool
from ._status import Finished, Pending, Running, WorkStatus

__all__ = [
    "BatchItem",
    "Debounce",
    "Finished",
    "InvalidBatchItem",
    "NotInPool",
    "Pending",
    "PoolGroup",
    "PoolGroupNotFound",
    "PoolNotFound",
    "RetryBehavior",
    "Running",
    "WorkStatus",
    "Workpool",
]
