"""The app that `bench.chaos` worker processes run: `tiers worker bench.chaos_app:retrier`.

Settings come from the environment, so the harness and every worker build the same app:

    CHAOS_DB_URL       the database (required)
    CHAOS_RECORD_DIR   where the capped pool's action records its intervals (required)
    CHAOS_CAP          the capped pool's max_parallelism (default 3)
    CHAOS_FAIL_PCT     share of attempts that fail, in percent (default 30)
    CHAOS_LEASE_S      the lease, in seconds (default 2)
    CHAOS_NAP_MS       the workflows' durable sleep, in milliseconds (default 200)

What it defines:

- `chaos_flaky(n, ms)`: a retrier action. Each attempt first writes one row to
  `chaos_effects` (kind "run", its own transaction, with its pid and start time),
  then sleeps `ms` and fails if the hash of (n, how many attempts reached the effect
  before) says so: a deterministic CHAOS_FAIL_PCT of attempts fail.
- `chaos_interval(item, ms)`: the capped pool's action. It appends "start" and later
  "end" lines to a file of its own item (not a table: the record must neither fail
  nor compete for the database lock whose behaviour is under test, and an attempt
  killed by SIGKILL leaves a start without an end), then fails like `chaos_flaky`.
- `chaos_step(label, step)`: the workflows' step action, recording effects like
  `chaos_flaky` (kind "step", key "label/step") and failing the same way.
- `chaos_flow(label)`: a workflow of four steps with a durable sleep after the second.
- `chaos_record`: the on_complete of everything above, with a `session`: it inserts
  one row per run into `chaos_completions` (UNIQUE run_id), in the transaction that
  marks the completion delivered. If the row is already there (a second delivery that
  committed), it writes to `chaos_duplicates` instead; a second delivery racing the
  first fails on the constraint, rolls back, and its retry then finds the row.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, func, insert, select
from sqlmodel import Session

from retrier import Retrier, RunResult
from workflow import WorkflowContext, WorkflowManager
from workpool import RetryBehavior, Workpool

CAPPED_POOL = "chaos-capped"
STEP_POOL = "chaos-steps"
STEP_CAP = 10  # the steps' pool's max_parallelism
WORKFLOW_STEPS = 4
MAX_FAILURES = 6  # retrier runs: 0.3**6, about 1 in 1,400 runs, fail for good
MAX_ATTEMPTS = 8  # pool items and workflow steps

meta = MetaData()
effects = Table(
    "chaos_effects",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(8), nullable=False),  # run | step
    Column("key", String(80), nullable=False, index=True),
    Column("seen", Integer, nullable=False),  # attempts of this key that reached it before
    Column("outcome", String(8), nullable=False),  # ok | fail (what the attempt will do)
    Column("pid", Integer, nullable=False),
    Column("started_us", BigInteger, nullable=False),  # when the attempt's action began
)
completions = Table(
    "chaos_completions",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(40), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),  # run | item | workflow
    Column("outcome", String(16), nullable=False),
)
duplicates = Table(
    "chaos_duplicates",
    meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(40), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("pid", Integer, nullable=False),
)
TABLES = [effects, completions, duplicates]


@dataclass(frozen=True)
class ChaosApp:
    """Everything a worker and the harness share."""

    retrier: Retrier
    pool: Workpool
    workflows: WorkflowManager


def should_fail(key: str, seen: int, fail_pct: int) -> bool:
    """Whether the attempt of `key` that follows `seen` earlier ones fails."""
    digest = hashlib.blake2b(f"{key}:{seen}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % 100 < fail_pct


def now_us() -> int:
    return time.time_ns() // 1000


def build(url: str, record_dir: Path, *, cap: int = 3, fail_pct: int = 30,
          lease_s: float = 2.0, nap_ms: int = 200) -> ChaosApp:
    """The app on `url`; creates its tables if they are missing."""
    retrier = Retrier(
        url,
        lease=timedelta(seconds=lease_s),
        poll_interval=timedelta(milliseconds=50),
        initial_backoff_ms=20,
        max_failures=MAX_FAILURES,
    )
    retrier.add_tables(TABLES)
    retry = RetryBehavior(max_attempts=MAX_ATTEMPTS, initial_backoff_ms=20)
    pool = Workpool(retrier, CAPPED_POOL, max_parallelism=cap,
                    retry_actions_by_default=True, default_retry_behavior=retry)
    steps = Workpool(retrier, STEP_POOL, max_parallelism=STEP_CAP,
                     retry_actions_by_default=True, default_retry_behavior=retry)
    workflows = WorkflowManager(steps)
    _register_actions(retrier, record_dir, fail_pct)
    _register_workflow(workflows, nap_ms)
    return ChaosApp(retrier, pool, workflows)


def _register_actions(retrier: Retrier, record_dir: Path, fail_pct: int) -> None:
    def effect(kind: str, key: str, started_us: int) -> bool:
        """Record this attempt's effect; True if the attempt must then fail."""
        with retrier.engine.begin() as conn:
            seen = conn.execute(
                select(func.count()).where(effects.c.key == key)
            ).scalar_one()
            fail = should_fail(key, seen, fail_pct)
            conn.execute(insert(effects).values(
                kind=kind, key=key, seen=seen, outcome="fail" if fail else "ok",
                pid=os.getpid(), started_us=started_us,
            ))
        return fail

    @retrier.action(name="chaos_flaky")
    def chaos_flaky(n: int, ms: int) -> int:
        fail = effect("run", f"run/{n}", now_us())
        time.sleep(ms / 1000)
        if fail:
            raise RuntimeError(f"injected failure of run {n}")
        return n

    @retrier.action(name="chaos_interval")
    def chaos_interval(item: int, ms: int) -> int:
        path = record_dir / str(item)
        seen = _count_starts(path)
        _mark(path, "start")
        time.sleep(ms / 1000)
        fail = should_fail(f"item/{item}", seen, fail_pct)
        _mark(path, "fail" if fail else "end")
        if fail:
            raise RuntimeError(f"injected failure of item {item}")
        return item

    @retrier.action(name="chaos_step")
    def chaos_step(label: str, step: int) -> int:
        fail = effect("step", f"{label}/{step}", now_us())
        time.sleep(0.005)
        if fail:
            raise RuntimeError(f"injected failure of {label} step {step}")
        return step

    @retrier.on_complete(name="chaos_record")
    def chaos_record(run_id: str, result: RunResult, context: Any, session: Session) -> None:
        found = session.execute(
            select(completions.c.id).where(completions.c.run_id == run_id)
        ).first()
        if found is None:
            session.execute(insert(completions).values(
                run_id=run_id, kind=context["kind"], outcome=result.kind))
        else:
            session.execute(insert(duplicates).values(
                run_id=run_id, outcome=result.kind, pid=os.getpid()))


def _register_workflow(workflows: WorkflowManager, nap_ms: int) -> None:
    @workflows.define(name="chaos_flow")
    async def chaos_flow(ctx: WorkflowContext, label: str) -> int:
        total = 0
        for i in range(WORKFLOW_STEPS):
            total += await ctx.step(f"s{i}", "chaos_step", {"label": label, "step": i})
            if i == 1:
                await ctx.sleep("nap", timedelta(milliseconds=nap_ms))
        return total


def _count_starts(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.startswith("start"))
    except FileNotFoundError:
        return 0


def _mark(path: Path, what: str) -> None:
    # One O_APPEND write per line: lines of concurrent attempts never interleave.
    line = f"{what} {os.getpid()} {time.time_ns()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@cache
def from_env() -> ChaosApp:
    """The app a worker process builds from its environment."""
    return build(
        os.environ["CHAOS_DB_URL"],
        Path(os.environ["CHAOS_RECORD_DIR"]),
        cap=int(os.environ.get("CHAOS_CAP", "3")),
        fail_pct=int(os.environ.get("CHAOS_FAIL_PCT", "30")),
        lease_s=float(os.environ.get("CHAOS_LEASE_S", "2")),
        nap_ms=int(os.environ.get("CHAOS_NAP_MS", "200")),
    )


def __getattr__(name: str) -> Any:
    if name == "retrier":
        return from_env().retrier
    raise AttributeError(name)
