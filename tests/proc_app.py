"""The app that worker processes in tests/test_processes.py run.

`tiers worker tests.proc_app:retrier` builds the Retrier from TIERS_TEST_DB. Each
attempt records a side effect in its own transaction; some runs fail once on purpose.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from functools import cache
from typing import Any

import anyio
from sqlalchemy import insert, select
from sqlmodel import Field, Session, SQLModel, func

from retrier import Retrier, RunResult


class Effect(SQLModel, table=True):
    """One row per attempt that reached the action's side effect."""

    __tablename__ = "test_effects"
    id: int | None = Field(default=None, primary_key=True)
    n: int = Field(index=True)
    pid: int


class Completion(SQLModel, table=True):
    """One row per on_complete delivery; written in the completion's transaction."""

    __tablename__ = "test_completions"
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    n: int
    outcome: str


def build(url: str) -> Retrier:
    retrier = Retrier(
        url,
        lease=timedelta(seconds=2),
        poll_interval=timedelta(milliseconds=50),
        initial_backoff_ms=50,
        max_failures=4,
    )
    SQLModel.metadata.create_all(
        retrier.engine,
        tables=[Effect.__table__, Completion.__table__],  # type: ignore[list-item]
    )

    @retrier.action(name="flaky")
    def flaky(n: int, slow: bool = False) -> int:
        with retrier.engine.begin() as conn:
            conn.execute(insert(Effect).values(n=n, pid=os.getpid()))
            seen = conn.execute(select(func.count()).where(Effect.n == n)).scalar_one()
        if slow:
            time.sleep(0.3)  # wide enough for a SIGKILL to land mid-action
        if n % 5 == 0 and seen == 1:
            raise RuntimeError(f"injected failure of {n}")
        return n

    @retrier.action(name="hangs")
    async def hangs(n: int) -> None:
        await anyio.sleep(3600)  # until the worker stops it

    @retrier.on_complete(name="completed")
    def completed(run_id: str, result: RunResult, context: Any, session: Session) -> None:
        session.add(Completion(run_id=run_id, n=context["n"], outcome=result.kind))

    return retrier


@cache
def _from_env() -> Retrier:
    return build(os.environ["TIERS_TEST_DB"])


def __getattr__(name: str) -> Any:
    if name == "retrier":
        return _from_env()
    raise AttributeError(name)
