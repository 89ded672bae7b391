"""The workflow tier's exceptions; all share the retrier's `TiersError` root."""

from __future__ import annotations

from retrier import (
    InvalidArguments,
    RunNotFinished,
    RunNotFound,
    TiersError,
    UnregisteredFunction,
)


class StepFailed(TiersError):
    """A step exhausted its retries (or was canceled). Raised inside the workflow at
    the step's `await`; catch it to compensate, or let it fail the workflow."""

    def __init__(self, step: str, error: str) -> None:
        super().__init__(f"step {step!r} failed: {error}")
        self.step = step
        self.error = error


class WorkflowDiverged(TiersError):
    """A replay reached a different step sequence than the journal recorded: the
    workflow's code changed, or it is not deterministic outside its steps."""

    def __init__(
        self,
        workflow_id: str,
        workflow: str,
        step: str,
        detail: str,
        *,
        expected: str = "",
        found: str = "",
    ) -> None:
        super().__init__(
            f"workflow {workflow!r} ({workflow_id}) diverged from its journal at step "
            f"{step!r}: {detail}. Code outside steps must be deterministic; to change "
            f"the steps of running workflows, guard the change with ctx.patched(...), "
            f"or restart or retrigger them"
        )
        self.workflow_id = workflow_id
        self.step = step
        self.expected = expected  # what the journal has there
        self.found = found  # what the code does instead


class WorkflowNotFound(RunNotFound):
    """No workflow with this id is stored (it never existed, or it was cleaned up)."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(workflow_id)
        self.args = (f"no workflow with id {workflow_id!r}",)


class WorkflowNotFinished(RunNotFinished):
    """The workflow is still running, so its state cannot be cleaned up yet."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(workflow_id)
        self.args = (f"workflow {workflow_id!r} has not finished; cancel it or wait for it first",)


class CannotRestart(TiersError):
    """`restart` refused: the workflow is still running (cancel it first), or the
    on_complete of its previous end is still being delivered (try again shortly)."""


class StepNotFound(TiersError, LookupError):
    """`restart(from_step=...)` named a step that the workflow's journal does not have."""

    def __init__(self, workflow_id: str, step: str, journaled: list[str]) -> None:
        names = ", ".join(repr(n) for n in journaled[:20]) or "none"
        super().__init__(
            f"workflow {workflow_id!r} has no journaled step {step!r}; its steps: {names}"
        )
        self.step = step


class UnregisteredWorkflow(UnregisteredFunction):
    """A workflow function was used (or named by a stored row) that is not defined."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "workflow")
        self.args = (
            f"workflow {name!r} is not defined; decorate it with @workflows.define in the "
            f"module the worker imports",
        )


class InvalidWorkflow(TiersError, TypeError):
    """A function given to `@workflows.define` cannot be a workflow."""


class InvalidEvent(InvalidArguments):
    """An event's name or payload cannot be stored: the name must be 1 to 200
    characters without NUL, the payload a dict of strict JSON (see `retrier._json`)."""
