"""The workpool's exceptions, under the retrier's `TiersError` root."""

from __future__ import annotations

from retrier import RunNotFound, TiersError


class NotInPool(RunNotFound):
    """The work id exists, but belongs to another pool (or to the plain retrier)."""

    def __init__(self, work_id: str, pool: str, owner: str) -> None:
        where = f"pool {owner!r}" if owner else "the retrier, not a pool"
        TiersError.__init__(self, f"work item {work_id!r} belongs to {where}, not to pool {pool!r}")
        self.run_id = work_id
        self.pool = pool
        self.owner = owner


class PoolNotFound(TiersError, LookupError):
    """No pool of this name has ever been configured on the database."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no pool named {name!r} is configured on this database")
        self.name = name


class PoolGroupNotFound(TiersError, LookupError):
    """No pool group of this name has been declared on the database."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no pool group named {name!r} is declared on this database")
        self.name = name


class InvalidBatchItem(TiersError, ValueError):
    """One item of `enqueue_batch` is invalid, so the whole batch was refused.

    Nothing was written. `index` is the item's position; `__cause__` the original error.
    """

    def __init__(self, index: int, total: int, cause: Exception) -> None:
        super().__init__(
            f"batch item {index} (of {total}) is invalid, so nothing was enqueued: "
            f"{type(cause).__name__}: {cause}"
        )
        self.index = index
