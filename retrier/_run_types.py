"""The engine's values: runs to insert, runs claimed, outcomes, what a record did.

Frozen dataclasses that cross module boundaries (store, worker, higher tiers); no
behaviour beyond small conveniences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from ._keys import Debounce

# An on_complete run inside the transaction that records the completion: it gets the
# transaction's connection (the worker wraps user handlers in a SQLModel Session).
SessionHandler = Callable[["Delivery", Connection], None]


@dataclass(frozen=True, slots=True)
class Runnable:
    """What a worker can run: it claims only pending runs of these `actions` and
    on_complete deliveries of these `handlers`, and leaves the rest to a worker that
    has them (a rolling deploy). None: anything (for tools and tests)."""

    actions: frozenset[str] | None = None
    handlers: frozenset[str] | None = None

    def params(self) -> dict[str, Any]:
        if self.actions is None or self.handlers is None:
            return {"any_fn": True, "fns": [], "handlers": []}
        return {"any_fn": False, "fns": sorted(self.actions), "handlers": sorted(self.handlers)}


ANYTHING = Runnable()


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker as the `tiers_workers` table keeps it."""

    id: str
    host: str
    pid: int
    concurrency: int
    lease_ms: int
    runnable: Runnable


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to insert."""

    id: str
    fn: str
    args: dict[str, Any]
    due_ms: int
    initial_backoff_ms: int
    base: float
    max_failures: int
    jitter: bool
    max_backoff_ms: int
    queue: str = ""
    key: str | None = None
    owner: str | None = None
    priority: int = 0
    on_complete: str | None = None
    context: Any = None
    trace: str | None = None  # the enqueuing trace context (W3C traceparent)
    timeout_ms: int | None = None  # how long one attempt may run (None: no limit)
    # Another run of the queue with this key already stored: its id is the answer.
    idempotency_key: str | None = None
    # Collapse into the pending run of (queue, fn, debounce key) when there is one.
    debounce: Debounce | None = None
    # The stored debounce key, when it is not `debounce.key` (a tier that scopes it).
    debounce_scope: str | None = None

    @property
    def plain(self) -> bool:
        """Inserted as it is: no key decides whether it collapses into another run."""
        return self.idempotency_key is None and self.debounce is None

    @property
    def debounce_key(self) -> str | None:
        if self.debounce is None:
            return None
        return self.debounce_scope or self.debounce.key


@dataclass(frozen=True, slots=True)
class Claimed:
    """A run this worker now holds a lease on, to execute or to deliver."""

    id: str
    fn: str
    args: dict[str, Any]
    state: str  # RUNNING: execute the action; DELIVERING: run its on_complete
    fence: int
    attempts: int
    failures: int
    queue: str
    owner: str | None
    on_complete: str | None
    context: Any
    outcome: str | None
    result: Any
    error: str | None
    started_ms: int
    trace: str | None = None  # the enqueuing trace context (W3C traceparent)
    due_ms: int | None = None  # when it was due (its enqueue, run_at or backoff's end)
    timeout_ms: int | None = None  # how long this attempt may run (None: no limit)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended, as the worker saw it."""

    run_id: str
    fence: int
    kind: str  # success | failure | fatal | canceled | released
    started_ms: int
    result: Any = None
    error: str | None = None
    retry_after_ms: int | None = None
    traceback: str | None = None  # of a failed attempt (its last lines if long)
    handler_in_txn: bool = False
    # What the worker knew of the run when it claimed it, for recording a plain
    # success (no on_complete) without reading the row back; the fence guards it.
    attempt: int | None = None
    queue: str = ""
    plain: bool = False
    fn: str = ""  # the action, for logs and metrics
    ended_ms: int | None = None  # when the attempt ended: a retry's backoff counts from it
    # How long before `ended_ms` (rounded up to a whole ms) it really ended, in ns.
    ended_early_ns: int = 0
    # The traceparent of this attempt's span, when its run had no stored trace context
    # (enqueued outside any trace) and goes on after it (a retry, an on_complete): the
    # record stores it as the run's, so what follows continues that trace.
    trace: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A run whose outcome is final and whose on_complete must now run."""

    id: str
    fn: str
    fence: int
    outcome: str
    result: Any
    error: str | None
    on_complete: str
    context: Any
    queue: str
    owner: str | None
    trace: str | None = None  # the run's enqueuing trace context


@dataclass(slots=True)
class Recorded:
    """What a record transaction did: what to deliver next, and what is done."""

    to_deliver: list[Delivery] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    # Runs claimed in the same transaction, into the slots the outcomes freed.
    claimed: list[Claimed] = field(default_factory=list)
    wake_at_ms: int | None = None


@dataclass(slots=True)
class Canceling:
    """What `cancel_many` did: how many runs it canceled, and which of them were
    running (their cancel is best effort, by the worker that holds them)."""

    count: int = 0
    running: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    lost: set[str]
    cancel_requested: set[str]


@dataclass(frozen=True, slots=True)
class QueueLimits:
    name: str
    max_parallelism: int | None = None
    rate_limit: int | None = None
    rate_period_ms: int | None = None
    max_per_key: int | None = None
    max_per_worker: int | None = None
    # Due runs start by priority (higher first); one due for longer than this starts
    # before every run due after it, whatever the priorities (None: due order).
    priority_aging_ms: int | None = None
    # Keys take turns (round-robin, one item per key per turn); within a key, due
    # order. None: the queue's order, whoever the keys are.
    round_robin: bool | None = None
    # Each key may start at most `key_rate_limit` runs in any window of this period.
    key_rate_limit: int | None = None
    key_rate_period_ms: int | None = None
    # A member of the pool group of this name (`QueueGroup`), guaranteed this many
    # of its slots (None without a group).
    group_name: str | None = None
    guaranteed: int | None = None


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    """A run's stored outcome (None while it has none) and how many attempts it took."""

    outcome: str | None
    result: Any
    error: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class OwnedRun:
    """A run a higher tier's unit owns (a workflow's step or driver)."""

    id: str
    fn: str
    state: str


@dataclass(frozen=True, slots=True)
class GroupMember:
    """One queue of a pool group, as stored now: its guarantee, its own cap, and its
    running runs."""

    name: str
    guaranteed: int
    max_parallelism: int | None
    running: int


@dataclass(frozen=True, slots=True)
class QueueGroup:
    """A pool group: a cap shared by its member queues, and the members as stored now."""

    name: str
    max_parallelism: int
    members: tuple[GroupMember, ...] = ()

    @property
    def running(self) -> int:
        """The members' running runs, together."""
        return sum(m.running for m in self.members)

    @property
    def guaranteed(self) -> int:
        """The members' guarantees, together (at most the cap)."""
        return sum(m.guaranteed for m in self.members)
