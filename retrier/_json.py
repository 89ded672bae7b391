"""What durable-tiers stores as JSON: one strict rule for every value of every tier.

Arguments, results, contexts, event data and event matches live in JSON columns.
At the edges the databases disagree (SQLite stores NaN, PostgreSQL refuses it) and
the serializers bend values without a word (`json` writes a tuple as a list and an
int key as a string; pydantic writes NaN as null and bytes as text). So a value is
checked against this rule before anything is written, and refused rather than changed.

Strict JSON is: a dict with string keys, a list, a string, an int, a finite float,
True, False or None; nested at most `MAX_DEPTH` lists and dicts deep. Strings may
hold any character, NUL included (names may not: see `_checks.check_name`).
"""

from __future__ import annotations

import collections.abc
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Union

from pydantic import AfterValidator

from ._errors import InvalidArguments, TiersError, ValueTooLarge

MAX_DEPTH = 64
"""Most levels of lists and dicts nested in one value (an argument, a result, a
context, event data). Deeper values are refused: they are almost always a mistake,
and each backend and serializer gives up at a different depth past a few hundred."""

_isfinite = math.isfinite

_Path = list[str | int]
_Found = tuple[_Path, str]  # where (innermost step first) and what


def json_problem(value: Any, depth: int = 1) -> str | None:
    """Why `value` is not strict JSON (with where in it), or None if it is.

    `depth` is the level of `value` itself: 1 for a whole value, 0 for a dict whose
    items are the values (the arguments of a call).
    """
    return _describe(_value(value, depth, []))


def check_json(value: Any, what: str, error: type[TiersError] = InvalidArguments) -> None:
    """Raise `error` ("<what> is not JSON: ...") unless `value` is strict JSON."""
    problem = json_problem(value)
    if problem is not None:
        raise error(f"{what} is not JSON: {problem}")


def json_size(value: Any) -> int:
    """How many bytes `value` takes as compact UTF-8 JSON (what a limit counts; a
    part that is not JSON counts as its `str`)."""
    dumped = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return len(dumped.encode())


def check_size(value: Any, what: str, limit: int) -> int:
    """`value`'s `json_size`; `ValueTooLarge` naming `what` and `limit` if over it.

    Every size limit of every tier is checked here, so each says the same thing.
    """
    size = json_size(value)
    if size > limit:
        raise ValueTooLarge(what, size, limit)
    return size


def dumped_problem(dumped: Any, python: Callable[[], Any]) -> str | None:
    """`json_problem` of a value pydantic dumped in JSON mode, and of the NaN or
    Infinity such a dump may have turned into null: a pydantic model met where the
    type says `Any` is dumped with its own config, which writes them as null.
    `python()` dumps the same value in Python mode, where they stay floats; it is
    called only if the JSON dump has a null to explain."""
    nulls: list[None] = []
    problem = _describe(_value(dumped, 1, nulls))
    if problem is None and nulls:
        problem = _describe(_hidden(dumped, python()))
    return problem


def _describe(found: _Found | None) -> str | None:
    if found is None:
        return None
    path, problem = found
    where = "".join(f"[{step!r}]" for step in reversed(path))
    return f"{problem} at {where}" if where else problem


# The walk: exact types first (what json and pydantic produce), subclasses after.
# `nulls` collects a None for each null met, for `dumped_problem`.


def _value(value: Any, depth: int, nulls: list[None]) -> _Found | None:
    kind = type(value)
    if kind is dict:
        return _dict(value, depth, nulls)
    if kind is list:
        return _list(value, depth, nulls)
    if kind is str or kind is int or kind is bool:
        return None
    if value is None:
        nulls.append(None)
        return None
    if kind is float:
        return None if _isfinite(value) else ([], f"{value!r} is not a JSON number")
    if isinstance(value, str | int):  # a str or int subclass (an enum) is its value
        return None
    if isinstance(value, float):
        return _value(float(value), depth, nulls)
    if isinstance(value, dict):
        return _dict(value, depth, nulls)
    if isinstance(value, list):
        return _list(value, depth, nulls)
    return [], _not_json(value)


def _dict(value: dict[Any, Any], depth: int, nulls: list[None]) -> _Found | None:
    if depth > MAX_DEPTH:
        return [], f"nested deeper than {MAX_DEPTH} levels"
    for key, item in value.items():
        if type(key) is not str and not isinstance(key, str):
            return [], f"the key {key!r} is not a string"
        kind = type(item)
        if kind is str or kind is int or kind is bool:
            continue
        found = _value(item, depth + 1, nulls)
        if found is not None:
            found[0].append(key)
            return found
    return None


def _list(value: list[Any], depth: int, nulls: list[None]) -> _Found | None:
    if depth > MAX_DEPTH:
        return [], f"nested deeper than {MAX_DEPTH} levels"
    for index, item in enumerate(value):
        kind = type(item)
        if kind is str or kind is int or kind is bool:
            continue
        found = _value(item, depth + 1, nulls)
        if found is not None:
            found[0].append(index)
            return found
    return None


def _hidden(dumped: Any, python: Any) -> _Found | None:
    """A NaN or Infinity in `python` where `dumped` (the same value's JSON dump) has
    null. Where the two differ in shape (a JSON-only serializer), it looks no deeper."""
    if dumped is None:
        if isinstance(python, float) and not _isfinite(python):
            return [], f"{python!r} is not a JSON number (a JSON dump would write null)"
        return None
    pairs: collections.abc.Iterable[tuple[str | int, Any, Any]] = ()
    if isinstance(dumped, dict) and isinstance(python, dict):
        pairs = ((key, item, python[key]) for key, item in dumped.items() if key in python)
    elif isinstance(dumped, list) and isinstance(python, list | tuple):
        if len(dumped) == len(python):
            pairs = ((i, *both) for i, both in enumerate(zip(dumped, python, strict=True)))
    for step, item, original in pairs:
        found = _hidden(item, original)
        if found is not None:
            found[0].append(step)
            return found
    return None


def _not_json(value: Any) -> str:
    kind = type(value).__name__
    if isinstance(value, tuple | set | frozenset):
        return f"a {kind} is not JSON (use a list, or annotate the parameter with its type)"
    if isinstance(value, bytes | bytearray):
        return f"{kind} is not JSON (decode it to a str, or annotate the parameter as bytes)"
    return f"a {kind} is not JSON (annotate the parameter with its type to store it)"


# -- the rule as a pydantic type, for the untyped parts of function signatures ----------


def _strict(value: Any) -> Any:
    problem = json_problem(value)
    if problem is not None:
        raise ValueError(f"not JSON: {problem}")
    return value


StrictJson = Annotated[Any, AfterValidator(_strict)]
"""`Any`, restricted to strict JSON: what an untyped parameter accepts."""

_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_COLLECTIONS = (
    list,
    tuple,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Set,
    collections.abc.MutableSet,
)


def strict_hint(hint: Any) -> Any:
    """`hint` with every `Any` in it (and the implied `Any` of a bare `dict` or `list`)
    restricted to strict JSON, and every `Any` key of a dict to `str`.

    Typed parts keep pydantic's conversions, which come back typed (a datetime is
    stored as text and returns a datetime); an untyped part would come back changed
    (bytes as text, a tuple as a list, an int key as a string), so it takes plain
    JSON only.
    """
    if _is_any(hint):
        return StrictJson
    if hint is dict:
        return _strict_whole(dict[str, Any])
    if hint is list:
        return _strict_whole(list[Any])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None or not args:
        return hint
    if origin is Annotated:
        return Annotated[(strict_hint(args[0]), *hint.__metadata__)]
    if origin is Union or origin is types.UnionType:
        return Union[tuple(strict_hint(a) for a in args)]  # noqa: UP007
    if origin in _MAPPINGS and len(args) == 2:
        key = str if _is_any(args[0]) else strict_hint(args[0])
        if origin is dict and _is_any(args[1]):
            return _strict_whole(dict[key, Any])  # type: ignore[valid-type]
        return origin[key, strict_hint(args[1])]
    if origin is list and _is_any(args[0]):
        return _strict_whole(list[Any])
    if origin in _COLLECTIONS:
        return origin[tuple(a if a is Ellipsis else strict_hint(a) for a in args)]
    return hint


def _is_any(hint: Any) -> bool:
    return hint is Any or hint is object


def _strict_whole(container: Any) -> Any:
    # A dict or list of Any: one check of the whole value, not one per item.
    return Annotated[container, AfterValidator(_strict)]
