"""The registry of actions and completion handlers of one Retrier.

Functions are stored by name in run rows; a worker executes only names registered
here, so a row can never make a worker import or call anything else.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, TypeAdapter
from pydantic_core import PydanticSerializationError

from ._checks import MAX_ATTEMPT_TIMEOUT, check_name, check_timeout
from ._errors import DuplicateRegistration, InvalidArguments, UnregisteredFunction
from ._json import dumped_problem, json_problem, strict_hint
from ._run_types import Runnable

Fn = Callable[..., Any]

# What the arguments model and the result adapter hold to the strict JSON rule of
# `_json`: a float argument must be finite (JSON has no NaN), and NaN or Infinity in
# an untyped part of a model survives the dump (pydantic would write null) so that
# `json_problem` refuses it instead of storing a silent change.
_ARGS_CONFIG = ConfigDict(
    extra="forbid",
    arbitrary_types_allowed=False,
    allow_inf_nan=False,
    ser_json_inf_nan="constants",
)
_RESULT_CONFIG = ConfigDict(ser_json_inf_nan="constants")
# Errors pydantic raises when a validated value cannot be dumped as JSON.
_DUMP_ERRORS = (PydanticSerializationError, ValueError, TypeError, RecursionError)


class ResultNotSerializable(TypeError):
    """An action returned a value that cannot be stored as JSON."""


@dataclass(frozen=True, slots=True)
class Registered:
    """A registered function with what is needed to validate and call it."""

    name: str
    fn: Fn
    is_async: bool
    args_model: type[BaseModel]
    result_adapter: TypeAdapter[tuple[Any]]
    """The return type, in a 1-tuple: a model's own config cannot be overridden, but
    its enclosing type's can (see `_RESULT_CONFIG`)."""
    takes_session: bool
    timeout_ms: int | None = None
    """How long one attempt may run unless its run says otherwise (None: no limit)."""

    def validate_args(self, args: dict[str, Any] | None) -> dict[str, Any]:
        """Validate `args` against the signature; return their JSON form for storage.

        Raises `InvalidArguments` if they do not match, or if their JSON form would not
        be strict JSON (see `_json`): nothing is ever stored changed.
        """
        if args is not None and not isinstance(args, dict):
            raise InvalidArguments(
                f"arguments for {self.name!r} must be a dict of parameter names, "
                f"got {type(args).__name__}"
            )
        if not args and not self.args_model.model_fields:
            return {}  # no parameters, no arguments: nothing to check or convert
        try:
            model = self.args_model.model_validate(args or {})
            dumped: dict[str, Any] = model.model_dump(mode="json")
        except pydantic.ValidationError as exc:
            raise InvalidArguments(f"invalid arguments for {self.name!r}: {exc}") from None
        except _DUMP_ERRORS as exc:
            raise InvalidArguments(
                f"the arguments for {self.name!r} cannot be stored as JSON: {_reason(exc)}"
            ) from None
        problem = json_problem(dumped, depth=0)
        if problem is not None:
            raise InvalidArguments(f"the arguments for {self.name!r} are not JSON: {problem}")
        return dumped

    def decode_args(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Typed keyword arguments from their stored JSON form."""
        model = self.args_model.model_validate(stored)
        return {name: getattr(model, name) for name in type(model).model_fields}

    def encode_result(self, value: Any) -> Any:
        """The JSON form of a result, as its return annotation dumps it; raises
        `ResultNotSerializable` if that is not strict JSON (NaN, Infinity, too deep)."""
        adapter = self.result_adapter
        try:
            dumped = adapter.dump_python((value,), mode="json")[0]
            problem = dumped_problem(dumped, lambda: adapter.dump_python((value,))[0])
        except _DUMP_ERRORS as exc:
            problem = _reason(exc)
        if problem is None:
            return dumped
        raise ResultNotSerializable(
            f"the result of {self.name!r} is not JSON-serializable: {problem}"
        )

    def decode_result(self, stored: Any) -> Any:
        try:
            return self.result_adapter.validate_python((stored,))[0]
        except pydantic.ValidationError:
            return stored


def arguments_model(fn: Fn, name: str, skip: int = 0) -> type[BaseModel]:
    """A pydantic model of `fn`'s parameters (after the first `skip` ones)."""
    signature = inspect.signature(fn)
    hints = _type_hints(fn)
    fields: dict[str, Any] = {}
    for param in list(signature.parameters.values())[skip:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise InvalidArguments(
                f"{name!r} takes *args or **kwargs; registered functions take named "
                f"parameters only"
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise InvalidArguments(f"{name!r} has positional-only parameters")
        annotation = strict_hint(hints.get(param.name, Any))
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    model: type[BaseModel] = pydantic.create_model(
        f"{name}_args", __config__=_ARGS_CONFIG, **fields
    )
    return model


def result_adapter(hint: Any) -> TypeAdapter[tuple[Any]]:
    """The adapter that dumps and loads results of type `hint` (see `Registered`)."""
    return TypeAdapter(tuple[hint], config=_RESULT_CONFIG)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "bytes that are not UTF-8 text (encode them into a str, e.g. base64)"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def describe(fn: Fn, name: str, skip: int = 0) -> Registered:
    """`fn` with its arguments model (after the first `skip` parameters) and result
    adapter: what validating, calling and storing it needs."""
    return Registered(
        name=name,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        args_model=arguments_model(fn, name, skip),
        result_adapter=result_adapter(return_hint(fn)),
        takes_session=False,
    )


def attempt_timeout_ms(timeout: timedelta | float) -> int:
    """An attempt's time limit in milliseconds: above 0, at most `MAX_ATTEMPT_TIMEOUT`
    (else `InvalidSettings`)."""
    return check_timeout(timeout, "timeout", MAX_ATTEMPT_TIMEOUT)


def return_hint(fn: Fn) -> Any:
    """The return annotation of `fn`, resolved (Any if it has none)."""
    return _type_hints(fn).get("return", Any)


def default_name(fn: Fn) -> str:
    """The name a function is registered under unless given one: its qualified name,
    without the `outer.<locals>.` part of a function defined inside another."""
    qualname = str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn)))
    return qualname.rpartition("<locals>.")[2]


def _type_hints(fn: Fn) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to Any
        return {}


class Registry:
    """Names to functions, for actions and for completion handlers."""

    def __init__(self) -> None:
        self._actions: dict[str, Registered] = {}
        self._handlers: dict[str, Registered] = {}
        self._names: dict[Fn, str] = {}
        self.version = 0  # grows with every registration
        self._runnable = (-1, Runnable())  # (version, what it lets a worker run)

    def add_action(
        self, fn: Fn, name: str | None = None, timeout: timedelta | float | None = None
    ) -> Registered:
        """Register `fn` as an action; `timeout` limits each attempt of its runs that
        set no limit of their own (see `check_timeout`)."""
        name = check_name(
            default_name(fn) if name is None else name, "an action name (pass name=...)"
        )
        timeout_ms = None if timeout is None else attempt_timeout_ms(timeout)
        reg = describe(fn, name)
        if timeout_ms is not None:
            reg = dataclasses.replace(reg, timeout_ms=timeout_ms)
        self._add(self._actions, reg, "action")
        return reg

    def add_handler(self, fn: Fn, name: str | None = None) -> Registered:
        name = check_name(
            default_name(fn) if name is None else name, "an on_complete name (pass name=...)"
        )
        params = inspect.signature(fn).parameters
        takes_session = "session" in params
        is_async = inspect.iscoroutinefunction(fn)
        if takes_session and is_async:
            raise InvalidArguments(
                f"on_complete handler {name!r} takes a session, so it must be a plain "
                f"'def': its writes commit in the worker's own transaction"
            )
        if len([p for p in params if p != "session"]) != 3:
            raise InvalidArguments(
                f"on_complete handler {name!r} must take (run_id, result, context"
                f"[, session]), got ({', '.join(params)})"
            )
        reg = Registered(
            name=name,
            fn=fn,
            is_async=is_async,
            args_model=BaseModel,
            result_adapter=result_adapter(Any),
            takes_session=takes_session,
        )
        self._add(self._handlers, reg, "on_complete")
        return reg

    def _add(self, table: dict[str, Registered], reg: Registered, kind: str) -> None:
        existing = table.get(reg.name)
        if existing is not None and existing.fn is reg.fn and existing.timeout_ms != reg.timeout_ms:
            raise DuplicateRegistration(
                f"{kind} {reg.name!r} is already registered with another timeout"
            )
        if existing is not None and existing.fn is not reg.fn:
            raise DuplicateRegistration(
                f"another {kind} is already registered as {reg.name!r}; "
                f"pass name=... to register this one under a different name"
            )
        table[reg.name] = reg
        self._names[reg.fn] = reg.name
        self.version += 1

    def names(self) -> tuple[list[str], list[str]]:
        """The names of every registered action, and of every handler."""
        return list(self._actions), list(self._handlers)

    def runnable(self) -> Runnable:
        """What a worker with this registry can run, as its claims filter runs."""
        version, runnable = self._runnable
        if version != self.version:
            runnable = Runnable(frozenset(self._actions), frozenset(self._handlers))
            self._runnable = (self.version, runnable)
        return runnable

    def action(self, fn_or_name: Fn | str) -> Registered:
        return self._lookup(self._actions, fn_or_name, "action")

    def handler(self, fn_or_name: Fn | str) -> Registered:
        return self._lookup(self._handlers, fn_or_name, "on_complete")

    def has_action(self, name: str) -> bool:
        return name in self._actions

    def _lookup(self, table: dict[str, Registered], fn_or_name: Fn | str, kind: str) -> Registered:
        if isinstance(fn_or_name, str):
            name = fn_or_name
        else:
            name = self._names.get(fn_or_name) or default_name(fn_or_name)
        reg = table.get(name)
        if reg is None or (not isinstance(fn_or_name, str) and reg.fn is not fn_or_name):
            raise UnregisteredFunction(name, kind)
        return reg
