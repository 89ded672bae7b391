"""The workflow tier's tables: workflows, their step journal, and events.

Times are integer epoch milliseconds, as in the engine's tables.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Index, Table, UniqueConstraint
from sqlmodel import Field, SQLModel

from retrier.engine import StoredJSON, partial_index

# Workflow states.
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELED = "canceled"
FINISHED = (COMPLETED, FAILED, CANCELED)

# Journal entry kinds and states.
STEP = "step"
SLEEP = "sleep"
EVENT = "event"
INVOKE = "invoke"
SEND = "send"
PATCH = "patch"  # a ctx.patched marker: this run took the patched path
WAITING = "waiting"  # a sleep, an event wait or a child workflow not yet over
# RUNNING, COMPLETED, FAILED and CANCELED are shared with workflows.


class WorkflowRow(SQLModel, table=True):
    """One run of a workflow function."""

    __tablename__ = "tiers_workflows"
    __table_args__ = (
        Index("ix_tiers_workflows_state_created", "state", "created_ms"),
        Index("ix_tiers_workflows_name", "name", "created_ms"),
        Index("ix_tiers_workflows_parent", "parent_id"),
        Index("ix_tiers_workflows_finished", "finished_ms"),  # retention
    )

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    pool: str = Field(max_length=200)
    args: Any = Field(sa_column=Column(StoredJSON, nullable=False))  # CorruptValue if bad
    state: str = Field(default=RUNNING, max_length=16)
    result: Any = Field(default=None, sa_column=Column(StoredJSON, nullable=True))
    error: str | None = None
    # The idempotency key `start` was given (the column keeps its first name): unique
    # across the namespace's workflows, freed when the workflow is deleted.
    key: str | None = Field(default=None, max_length=200, unique=True)
    parent_id: str | None = Field(default=None, max_length=40)
    parent_step: str | None = Field(default=None, max_length=200)
    retrigger_of: str | None = Field(default=None, max_length=40)
    on_complete: str | None = Field(default=None, max_length=200)
    context: Any = Field(default=None, sa_column=Column(StoredJSON, nullable=True))
    created_ms: int = Field(sa_type=BigInteger)
    finished_ms: int | None = Field(default=None, sa_type=BigInteger)
    # Since when the workers that took its driver lacked its code (a rolling deploy);
    # cleared by one that has it. Past the retrier's unregistered_grace, it fails.
    unrunnable_since_ms: int | None = Field(default=None, sa_type=BigInteger)
    # When it fails if still running (`start(..., timeout=)`); None: never.
    deadline_ms: int | None = Field(default=None, sa_type=BigInteger)
    # What `ctx.set_progress` last stored, and the ordinal of that call in the
    # workflow's code: a replay's earlier calls (lower ordinals) never overwrite it.
    progress: Any = Field(default=None, sa_column=Column(StoredJSON, nullable=True))
    progress_seq: int = 0
    # Until when a `watch` (on PostgreSQL) wants notifications of its changes.
    watched_until_ms: int | None = Field(default=None, sa_type=BigInteger)


class StepRow(SQLModel, table=True):
    """One journal entry: a step, sleep, event wait, child workflow or sent event."""

    __tablename__ = "tiers_workflow_steps"
    __table_args__ = (
        UniqueConstraint("workflow_id", "name", name="uq_tiers_workflow_steps_name"),
        # send_event finds the workflows waiting for an event by its name.
        Index(
            "ix_tiers_workflow_steps_waiting",
            "event_name",
            **partial_index("state = 'waiting' AND kind = 'event'"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    workflow_id: str = Field(max_length=40)
    name: str = Field(max_length=240)  # the step's name and occurrence: "fetch[1]"
    position: int  # order of the call in the workflow, for divergence checks
    kind: str = Field(max_length=16)
    state: str = Field(max_length=16)
    fn: str | None = Field(default=None, max_length=200)
    run_id: str | None = Field(default=None, max_length=40)
    result: Any = Field(default=None, sa_column=Column(StoredJSON, nullable=True))
    error: str | None = None
    attempts: int = 0
    started_ms: int = Field(sa_type=BigInteger)
    finished_ms: int | None = Field(default=None, sa_type=BigInteger)
    wake_ms: int | None = Field(default=None, sa_type=BigInteger)
    event_name: str | None = Field(default=None, max_length=200)
    match: Any = Field(default=None, sa_column=Column(StoredJSON, nullable=True))
    event_id: int | None = Field(default=None, sa_type=BigInteger)
    child_id: str | None = Field(default=None, max_length=40)
    # A step result larger than the journal keeps inline lives in tiers_workflow_results
    # (its size here, its `result` null), read only when a replay reaches the step.
    result_size: int | None = Field(default=None)


class EventRow(SQLModel, table=True):
    """An event sent with `send_event`, kept for workflows that wait for it later."""

    __tablename__ = "tiers_workflow_events"
    __table_args__ = (
        Index("ix_tiers_workflow_events_name", "name", "id"),
        Index("ix_tiers_workflow_events_created", "created_ms"),  # retention
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    data: Any = Field(sa_column=Column(StoredJSON, nullable=False))
    created_ms: int = Field(sa_type=BigInteger)


class LogRow(SQLModel, table=True):
    """A line of `ctx.log`, kept with the journal entry the workflow had reached.

    `seq` is the line's ordinal in the workflow's code, so a replay that logs the same
    lines again stores nothing new.
    """

    __tablename__ = "tiers_workflow_logs"
    __table_args__ = (UniqueConstraint("workflow_id", "seq", name="uq_tiers_workflow_logs_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    workflow_id: str = Field(max_length=40)
    seq: int
    step: str | None = Field(default=None, max_length=240)
    level: str = Field(max_length=16)
    message: str
    created_ms: int = Field(sa_type=BigInteger)


class ResultRow(SQLModel, table=True):
    """A large step result, kept out of the journal so that loading it stays cheap."""

    __tablename__ = "tiers_workflow_results"

    workflow_id: str = Field(primary_key=True, max_length=40)
    name: str = Field(primary_key=True, max_length=240)
    result: Any = Field(sa_column=Column(StoredJSON, nullable=True))


workflows_t: Table = WorkflowRow.__table__  # type: ignore[attr-defined]
steps_t: Table = StepRow.__table__  # type: ignore[attr-defined]
events_t: Table = EventRow.__table__  # type: ignore[attr-defined]
logs_t: Table = LogRow.__table__  # type: ignore[attr-defined]
results_t: Table = ResultRow.__table__  # type: ignore[attr-defined]

TABLES = [workflows_t, steps_t, events_t, logs_t, results_t]
