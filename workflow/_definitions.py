"""Workflow definitions: a workflow function with what is needed to validate and call it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retrier import InvalidArguments
from retrier.engine import Registered, default_name, describe_function, return_hint

from ._errors import InvalidWorkflow, UnregisteredWorkflow
from ._limits import check_args

WorkflowFn = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    """A defined workflow: `async def fn(ctx, **args)` under a stable name.

    Its arguments and result are validated and stored exactly as an action's are
    (`signature`, skipping the context parameter).
    """

    name: str
    fn: WorkflowFn
    signature: Registered
    return_hint: Any

    def validate_args(self, args: dict[str, Any] | None) -> dict[str, Any]:
        """Validate `args` against the signature; their JSON form, for storage (at
        most `MAX_ARGS`, else `ValueTooLarge`)."""
        stored = self.signature.validate_args(args)
        check_args(stored, f"the arguments of workflow {self.name!r}")
        return stored

    def decode_args(self, stored: dict[str, Any]) -> dict[str, Any]:
        return self.signature.decode_args(stored)

    def encode_result(self, value: Any) -> Any:
        return self.signature.encode_result(value)

    def decode_result(self, stored: Any) -> Any:
        return self.signature.decode_result(stored)


def define(fn: WorkflowFn, name: str | None = None) -> WorkflowDef:
    """Check that `fn` can be a workflow and describe it."""
    name = name or default_name(fn)
    if not inspect.iscoroutinefunction(fn):
        raise InvalidWorkflow(
            f"workflow {name!r} must be an 'async def' taking (ctx, **args); "
            f"got a {type(fn).__name__} that is not a coroutine function"
        )
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (
        params[0].POSITIONAL_ONLY,
        params[0].POSITIONAL_OR_KEYWORD,
    ):
        raise InvalidWorkflow(f"workflow {name!r} must take the context as its first parameter")
    try:
        signature = describe_function(fn, name, skip=1)
    except InvalidArguments as exc:
        raise InvalidWorkflow(str(exc)) from None
    return WorkflowDef(name, fn, signature, return_hint(fn))


class Definitions:
    """The workflows of one manager, by name and by function."""

    def __init__(self) -> None:
        self._by_name: dict[str, WorkflowDef] = {}
        self._by_fn: dict[WorkflowFn, WorkflowDef] = {}

    def add(self, d: WorkflowDef) -> None:
        from retrier import DuplicateRegistration

        existing = self._by_name.get(d.name)
        if existing is not None and existing.fn is not d.fn:
            raise DuplicateRegistration(
                f"another workflow is already defined as {d.name!r}; pass name=... "
                f"to define this one under a different name"
            )
        self._by_name[d.name] = d
        self._by_fn[d.fn] = d

    def has(self, name: str) -> bool:
        return name in self._by_name

    def get(self, fn_or_name: WorkflowFn | str) -> WorkflowDef:
        if isinstance(fn_or_name, str):
            found = self._by_name.get(fn_or_name)
            if found is None:
                raise UnregisteredWorkflow(fn_or_name)
            return found
        found = self._by_fn.get(fn_or_name)
        if found is None:
            raise UnregisteredWorkflow(str(getattr(fn_or_name, "__qualname__", fn_or_name)))
        return found
