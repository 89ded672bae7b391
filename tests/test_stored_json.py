"""StoredJSON's processors: the values most runs store take a short way (no codec),
which must give exactly what the codec gives."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Dialect
from sqlalchemy.dialects import postgresql, sqlite

from retrier.engine import CorruptValue, StoredJSON


def _codec_bind(dialect: Dialect) -> Any:
    """The bind processor of the JSON type StoredJSON wraps, as the dialect has it."""
    adapted = StoredJSON().dialect_impl(dialect)
    assert isinstance(adapted, StoredJSON)
    return adapted.load_dialect_impl(dialect).bind_processor(dialect)


def _processors(dialect: Dialect) -> tuple[Any, Any]:
    """StoredJSON's processors as a statement gets them (`CompiledWrite`)."""
    adapted = StoredJSON().dialect_impl(dialect)
    return adapted.bind_processor(dialect), adapted.result_processor(dialect, None)


def _sqlite_processors() -> tuple[Any, Any]:
    return _processors(sqlite.dialect())


@pytest.mark.parametrize(
    "value", [None, {}, [], "null", "{}", 0, 1.5, True, {"a": 1}, [{}], {"": None}]
)
def test_values_round_trip_as_the_codec_makes_them(value: Any) -> None:
    bind, result = _sqlite_processors()
    stored = bind(value)
    assert stored == _codec_bind(sqlite.dialect())(value)
    assert result(stored) == value
    assert type(result(stored)) is type(value)


def test_an_empty_object_read_twice_is_two_objects() -> None:
    # A shared {} would carry one run's changes to its arguments into another's.
    _, result = _sqlite_processors()
    first, second = result("{}"), result("{}")
    first["changed"] = True
    assert second == {}


def test_corrupt_values_still_read_as_corrupt_and_write_back_unchanged() -> None:
    bind, result = _sqlite_processors()
    read = result("{not json")
    assert isinstance(read, CorruptValue)
    assert bind(read) == "{not json"


def test_postgres_binds_the_common_values_as_its_driver_would() -> None:
    dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
    bind, _ = _processors(dialect)
    inner = _codec_bind(dialect)
    assert bind is not None and inner is not None
    for value in (None, {}, {"a": [1]}):
        assert repr(bind(value)) == repr(inner(value))
    assert bind(CorruptValue("{x", "bad")) == "{x"
