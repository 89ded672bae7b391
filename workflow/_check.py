"""`workflows.check()`: replay every unfinished workflow's journal against this code,
executing nothing, and report which would diverge (or fail) and where.

Each workflow function runs on a dry context: journaled calls return their journaled
results; the first call that would run, wait or write anything stops the replay (the
journal agreed with the code up to there). A divergence by the rules of `_replay`, a
workflow this code does not define, or an error raised by the code before that point
is reported. Nothing is written, so it is safe against a live database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from retrier.engine import describe_error

from ._context import Frontier, Suspend, WorkflowContext
from ._errors import WorkflowDiverged
from ._models import RUNNING, workflows_t

if TYPE_CHECKING:
    from ._driver import Driver
    from ._journal_reads import Loaded

DIVERGED = "diverged"
FAILS = "fails"
UNDEFINED = "undefined"


@dataclass(frozen=True, slots=True)
class CheckProblem:
    """One unfinished workflow that this code would not carry on as its journal says.

    `kind`: "diverged" (the replay leaves the journal: `step` is the journal's entry
    there, `expected` what the journal has, `found` what the code does), "fails" (the
    code raises before reaching new work: `detail` is the error) or "undefined" (this
    code does not define the workflow).
    """

    workflow_id: str
    workflow: str
    kind: str
    step: str | None
    expected: str
    found: str
    detail: str


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What `WorkflowManager.check` found: how many workflows it replayed, and the
    problems. `ok` is True when there is none (a deploy of this code is safe for
    every unfinished workflow)."""

    checked: int
    problems: list[CheckProblem]

    @property
    def ok(self) -> bool:
        return not self.problems


def unfinished_ids(driver: Driver, limit: int | None) -> list[str]:
    """The running workflows of this manager's pool, oldest first."""
    stmt = (
        select(workflows_t.c.id)
        .where(workflows_t.c.state == RUNNING, workflows_t.c.pool == driver.pool_name)
        .order_by(workflows_t.c.created_ms, workflows_t.c.id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    with driver.journal.dialect.read() as conn:
        return [str(i) for i in conn.execute(stmt).scalars()]


async def check_one(driver: Driver, loaded: Loaded) -> CheckProblem | None:
    """Replay one workflow dry; its problem, or None if it agrees with its journal."""
    wf = loaded.workflow
    if not driver.defs.has(wf.name):
        return CheckProblem(
            wf.id,
            wf.name,
            UNDEFINED,
            None,
            f"workflow {wf.name!r}",
            "not defined",
            f"this code does not define workflow {wf.name!r}",
        )
    ctx = WorkflowContext(driver, loaded, None, dry=True)
    failure: str | None = None
    try:
        definition = driver.defs.get(wf.name)
        await definition.fn(ctx, **definition.decode_args(wf.args))
    except (Frontier, Suspend):
        pass
    except WorkflowDiverged:
        pass  # recorded on the context
    except Exception as exc:
        failure = describe_error(exc)
    else:
        ctx.ended()
    finally:
        await ctx.drain()
    d = ctx.diverged
    if d is not None:
        return CheckProblem(wf.id, wf.name, DIVERGED, d.step, d.expected, d.found, str(d))
    if failure is not None:
        return CheckProblem(wf.id, wf.name, FAILS, None, "", "", failure)
    return None
