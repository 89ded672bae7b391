"""The engine's tables. Times are integer epoch milliseconds: indexable, tz-free.

A run moves through these states::

    pending --claim--> running --outcome--> delivering --handler--> completed
       ^                  |                                  (no on_complete: straight
       +--retry (backoff)-+                                   to completed)

`finishing` is a `delivering` run whose handler must be (re)tried by any worker:
its worker died, or the handler raised.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Index
from sqlmodel import Field, SQLModel

from ._dialects import partial_index
from ._stored_json import StoredJSON

SCHEMA_VERSION = 2
"""What `tiers_meta` says (written by the migrations): releases before migrations
refuse a database whose version is above theirs (1)."""

PENDING = "pending"
RUNNING = "running"
DELIVERING = "delivering"
FINISHING = "finishing"
COMPLETED = "completed"

SUCCESS = "success"
FAILED = "failed"
CANCELED = "canceled"

CLAIMABLE = (PENDING, FINISHING)
LEASED = (RUNNING, DELIVERING)


class MetaRow(SQLModel, table=True):
    """Key/value facts about the database itself, such as its schema version."""

    __tablename__ = "tiers_meta"

    key: str = Field(primary_key=True)
    value: int


class RunRow(SQLModel, table=True):
    """One durable run of a registered action."""

    __tablename__ = "tiers_runs"
    # Indexes are partial where they can be, so each holds only the rows its query
    # needs and stays small however many finished runs are stored. (Defined after the
    # class, since the claim index needs a descending column.)

    id: str = Field(primary_key=True, max_length=40)
    fn: str = Field(max_length=200)
    # Any, not dict: a row whose value cannot be decoded reads as a CorruptValue.
    args: Any = Field(sa_column=Column(StoredJSON, nullable=False))
    state: str = Field(default=PENDING, max_length=16)
    outcome: str | None = Field(default=None, max_length=16)
    result: Any = Field(default=None, sa_column=Column(StoredJSON, nullable=True))
    error: str | None = None
    attempts: int = 0
    failures: int = 0
    due_ms: int = Field(sa_type=BigInteger)
    priority: int = 0
    queue: str = Field(default="", max_length=200)
    key: str | None = Field(default=None, max_length=200)
    owner: str | None = Field(default=None, max_length=200)
    lease_owner: str | None = Field(default=None, max_length=120)
    lease_until_ms: int | None = Field(default=None, sa_type=BigInteger)
    fence: int = 0
    cancel_requested: bool = False
    initial_backoff_ms: int = 250
    base: float = 2.0
    max_failures: int = 4
    jitter: bool = False
    max_backoff_ms: int = Field(default=3_600_000, sa_type=BigInteger)
    on_complete: str | None = Field(default=None, max_length=200)
    context: Any = Field(default=None, sa_column=Column(StoredJSON, nullable=True))
    handler_failures: int = 0
    handler_error: str | None = None
    created_ms: int = Field(sa_type=BigInteger)
    started_ms: int | None = Field(default=None, sa_type=BigInteger)
    finished_ms: int | None = Field(default=None, sa_type=BigInteger)
    # The W3C traceparent of the context that enqueued the run (tracing on), so its
    # attempts, in any process, belong to the enqueuing trace.
    trace: str | None = Field(default=None, max_length=128)
    # A second enqueue with the same key in the same queue gets this run's id, for as
    # long as the run is kept (a unique index; deleting the run frees the key).
    idempotency_key: str | None = Field(default=None, max_length=200)
    # Calls with the same debounce key (and queue and function) collapse into this
    # run while it has not started.
    debounce_key: str | None = Field(default=None, max_length=400)
    # How long one attempt may run (None: no limit); past it, the attempt fails.
    timeout_ms: int | None = Field(default=None, sa_type=BigInteger)


_runs = RunRow.__table__  # type: ignore[attr-defined]
# Claiming: the due runs in due order, then priority.
Index(
    "ix_tiers_runs_claim",
    _runs.c.due_ms,
    _runs.c.priority.desc(),
    **partial_index("state IN ('pending', 'finishing')"),
)
# Claiming from some queues while others are at their limit: each queue's due runs in
# due order, and the set of queues that have claimable runs (a few index seeks).
Index(
    "ix_tiers_runs_queue_due",
    _runs.c.queue,
    _runs.c.due_ms,
    _runs.c.priority.desc(),
    **partial_index("state IN ('pending', 'finishing')"),
)
# Claiming from a queue by priority: its pending runs of one priority in due order,
# and its distinct priorities (a loose scan, one seek each).
Index(
    "ix_tiers_runs_queue_priority",
    _runs.c.queue,
    _runs.c.priority.desc(),
    _runs.c.due_ms,
    **partial_index("state = 'pending'"),
)
# Round-robin between keys: a queue's distinct keys (a loose scan) and each key's
# first due pending run.
Index(
    "ix_tiers_runs_queue_key_due",
    _runs.c.queue,
    _runs.c.key,
    _runs.c.due_ms,
    _runs.c.priority.desc(),
    **partial_index("state = 'pending'"),
)
# on_complete deliveries waiting to run again, which no queue limit holds back.
Index(
    "ix_tiers_runs_finishing",
    _runs.c.due_ms,
    **partial_index("state = 'finishing'"),
)
# Per-queue and per-key running counts, for pool limits.
Index(
    "ix_tiers_runs_running",
    _runs.c.queue,
    _runs.c.key,
    **partial_index("state = 'running'"),
)
# Lease reaping.
Index(
    "ix_tiers_runs_leased",
    _runs.c.lease_until_ms,
    **partial_index("state IN ('running', 'delivering')"),
)
# Retention.
Index(
    "ix_tiers_runs_finished",
    _runs.c.finished_ms,
    **partial_index("state = 'completed'"),
)
# Listing, newest first.
Index("ix_tiers_runs_created", _runs.c.created_ms)
# The runs of one owner (a workflow's steps); runs without one stay out (engine_0010).
Index("ix_tiers_runs_owner", _runs.c.owner, **partial_index("owner IS NOT NULL"))
# Idempotency keys, one run per key in each queue (NULLs never conflict).
Index(
    "ux_tiers_runs_idempotency",
    _runs.c.queue,
    _runs.c.idempotency_key,
    unique=True,
    **partial_index("idempotency_key IS NOT NULL"),
)
# The run a debounced call may collapse into.
Index(
    "ix_tiers_runs_debounce",
    _runs.c.queue,
    _runs.c.debounce_key,
    **partial_index("debounce_key IS NOT NULL AND state = 'pending'"),
)


class AttemptRow(SQLModel, table=True):
    """One finished attempt of a run: when it ran, where, and how it ended."""

    __tablename__ = "tiers_attempts"
    __table_args__ = (
        Index("ix_tiers_attempts_run", "run_id", "number"),
        Index("ix_tiers_attempts_queue_started", "queue", "started_ms"),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=40)
    number: int
    queue: str = Field(default="", max_length=200)
    worker: str | None = Field(default=None, max_length=120)
    started_ms: int = Field(sa_type=BigInteger)
    finished_ms: int = Field(sa_type=BigInteger)
    outcome: str = Field(max_length=16)  # success | failed | canceled | lost | released
    error: str | None = None
    traceback: str | None = None  # of a failed attempt, its last lines if long


class QueueRow(SQLModel, table=True):
    """Limits that every worker sharing the database enforces on one queue.

    The retrier's own runs use the unlimited queue ''. Workpools are queues.
    """

    __tablename__ = "tiers_queues"

    name: str = Field(primary_key=True, max_length=200)
    max_parallelism: int | None = None
    rate_limit: int | None = None
    rate_period_ms: int | None = Field(default=None, sa_type=BigInteger)
    max_per_key: int | None = None
    max_per_worker: int | None = None
    priority_aging_ms: int | None = Field(default=None, sa_type=BigInteger)
    round_robin: bool | None = None
    key_rate_limit: int | None = None
    key_rate_period_ms: int | None = Field(default=None, sa_type=BigInteger)
    # Where a round-robin queue's turn is: the last key (group) a claim visited; ''
    # for the items without a key.
    rr_cursor: str | None = Field(default=None, max_length=200)
    # The pool group whose cap this queue shares (tiers_queue_groups), and the slots
    # of that cap it is guaranteed (lent to the other members while it has no due run).
    group_name: str | None = Field(default=None, max_length=200)
    guaranteed: int | None = None
    updated_ms: int = Field(sa_type=BigInteger)


class QueueGroupRow(SQLModel, table=True):
    """A cap shared by several queues (a pool group): at most `max_parallelism` runs
    of its members run at once, each member having its `guaranteed` slots of it.

    Stored as data, so it changes at runtime; claims lock its row, so every member's
    claims (and inline starts) take its slots one after the other.
    """

    __tablename__ = "tiers_queue_groups"

    name: str = Field(primary_key=True, max_length=200)
    max_parallelism: int
    updated_ms: int = Field(sa_type=BigInteger)


class KeyLimitRow(SQLModel, table=True):
    """One key's own cap in a queue (a tenant's limit), overriding its `max_per_key`.

    Stored as data, so it changes at runtime, in the caller's transaction if need be;
    every claim applies it under the queue's lock.
    """

    __tablename__ = "tiers_key_limits"

    queue: str = Field(primary_key=True, max_length=200)
    key: str = Field(primary_key=True, max_length=200)
    max_parallelism: int
    updated_ms: int = Field(sa_type=BigInteger)


class KeyStartRow(SQLModel, table=True):
    """One start of a run of a key, in a queue with a per-key rate limit: what the
    key's rate window counts. Written by the claim that starts it; a claim deletes a
    key's starts once they are out of its window."""

    __tablename__ = "tiers_key_starts"
    __table_args__ = (Index("ix_tiers_key_starts", "queue", "key", "started_ms"),)

    id: int | None = Field(default=None, primary_key=True)
    queue: str = Field(max_length=200)
    key: str = Field(max_length=200)
    started_ms: int = Field(sa_type=BigInteger)


class WorkerRow(SQLModel, table=True):
    """A live worker: what it can run, refreshed by its heartbeat, deleted when it stops.

    A run whose function no live worker has registered is left pending; only after a
    grace period with no such worker does it fail (see `Store.fail_unrunnable`).
    """

    __tablename__ = "tiers_workers"

    id: str = Field(primary_key=True, max_length=120)
    host: str = Field(max_length=200)
    pid: int
    concurrency: int
    lease_ms: int = Field(sa_type=BigInteger)
    functions: Any = Field(sa_column=Column(StoredJSON, nullable=False))
    handlers: Any = Field(sa_column=Column(StoredJSON, nullable=False))
    started_ms: int = Field(sa_type=BigInteger)
    heartbeat_ms: int = Field(sa_type=BigInteger)


class ScheduleRow(SQLModel, table=True):
    """A cron schedule: the run it starts at each tick, and when the next tick is.

    Whichever worker first sees `next_fire_ms` pass moves it on with a
    compare-and-set in the transaction that inserts the tick's run, so each tick
    starts one run however many workers look (see `_schedules.py`).
    """

    __tablename__ = "tiers_schedules"

    name: str = Field(primary_key=True, max_length=200)
    target: str = Field(max_length=16)  # run | pool | workflow: what a tick starts
    fn: str = Field(max_length=200)
    args: Any = Field(sa_column=Column(StoredJSON, nullable=False))
    # The rest of the run a tick starts (queue, retry policy, on_complete, ...).
    options: Any = Field(sa_column=Column(StoredJSON, nullable=False))
    cron: str = Field(max_length=120)
    timezone: str = Field(max_length=64)
    missed: str = Field(max_length=8)  # latest | all | none
    paused: bool = False
    next_fire_ms: int | None = Field(default=None, sa_type=BigInteger)
    last_fire_ms: int | None = Field(default=None, sa_type=BigInteger)
    last_run_id: str | None = Field(default=None, max_length=40)
    created_ms: int = Field(sa_type=BigInteger)
    updated_ms: int = Field(sa_type=BigInteger)


Index(
    "ix_tiers_schedules_due",
    ScheduleRow.__table__.c.next_fire_ms,  # type: ignore[attr-defined]
    **partial_index("paused = false"),
)


ENGINE_TABLES = [
    MetaRow.__table__,  # type: ignore[attr-defined]
    RunRow.__table__,  # type: ignore[attr-defined]
    AttemptRow.__table__,  # type: ignore[attr-defined]
    QueueRow.__table__,  # type: ignore[attr-defined]
    WorkerRow.__table__,  # type: ignore[attr-defined]
    ScheduleRow.__table__,  # type: ignore[attr-defined]
    KeyLimitRow.__table__,  # type: ignore[attr-defined]
    KeyStartRow.__table__,  # type: ignore[attr-defined]
    QueueGroupRow.__table__,  # type: ignore[attr-defined]
]
