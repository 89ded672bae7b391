"""JSON columns whose reads never raise: a value that cannot be decoded comes back as
`CorruptValue`, so one bad row fails by itself instead of every query that reads it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Dialect
from sqlalchemy.types import TypeDecorator


@dataclass(frozen=True, slots=True)
class CorruptValue:
    """A stored JSON value that could not be decoded (a hand edit, a bug, a partial
    restore). Written back unchanged if its row is updated."""

    raw: str
    error: str

    def __str__(self) -> str:
        shown = self.raw if len(self.raw) <= 40 else self.raw[:39] + "…"
        return f"<corrupt: {shown!r} ({self.error})>"


class StoredJSON(TypeDecorator[Any]):
    """`JSON`, except that decoding errors become `CorruptValue`s."""

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        inner = self.load_dialect_impl(dialect).bind_processor(dialect)
        if inner is None:  # the driver encodes (psycopg)

            def raw_or_value(value: Any) -> Any:
                return value.raw if isinstance(value, CorruptValue) else value

            return raw_or_value
        # The values most runs store (no result, no arguments), encoded once.
        null, empty = inner(None), inner({})

        def process(value: Any) -> Any:
            if value is None:
                return null
            if type(value) is dict and not value:
                return empty
            if isinstance(value, CorruptValue):
                return value.raw
            return inner(value)

        return process

    def result_processor(
        self, dialect: Dialect, coltype: object
    ) -> Callable[[Any], Any] | None:
        inner = self.load_dialect_impl(dialect).result_processor(dialect, coltype)
        if inner is None:  # the driver decodes (psycopg); the server refuses bad JSON
            return None

        def process(value: Any) -> Any:
            # The values most runs store (no arguments, no result), without the
            # decoder: a new dict each time, as the decoder would make.
            if value is None or value == "null":
                return None
            if value == "{}":
                return {}
            try:
                return inner(value)
            except ValueError as exc:  # json.JSONDecodeError, bad UTF-8
                return CorruptValue(str(value), f"{type(exc).__name__}: {exc}")

        return process


def unreadable(what: str, value: Any, *, need_object: bool = False) -> str | None:
    """Why the stored `what` ("args", "context", ...) cannot be used, or None if it can.

    `need_object`: only a JSON object will do (a run's arguments).
    """
    if isinstance(value, CorruptValue):
        return f"the stored {what} cannot be decoded: {value.error}"
    if need_object and not isinstance(value, dict):
        return (
            f"the stored {what} cannot be decoded: expected a JSON object, "
            f"found {type(value).__name__}"
        )
    return None
