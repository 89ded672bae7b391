"""Bad input gets the same answer on SQLite and PostgreSQL (DESIGN.md, "Bad input and
failure"): a `TiersError` subclass raised before anything is written, and never a
silent change of the value. The table in docs/retrier.md lists each case."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import func, select, text

from retrier import (
    Completed,
    Failed,
    FakeClock,
    InvalidArguments,
    InvalidSettings,
    Retrier,
    RetryAfter,
    RetryPolicy,
    Success,
    TiersError,
)
from tests.support import drain
from workflow import InvalidEvent, WorkflowContext, WorkflowManager
from workflow._models import workflows_t
from workpool import InvalidBatchItem, RetryBehavior, Workpool

MakeRetrier = Callable[..., Retrier]

NAN, INF = math.nan, math.inf
MAX_DEPTH = 64  # documented in docs/retrier.md
CENTURY = timedelta(days=36_525)  # the documented range of due times: 100 years


def nested(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def count_runs(retrier: Retrier) -> int:
    with retrier.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar() or 0)


def circular() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


NOT_JSON: list[Any] = [
    NAN,
    INF,
    -INF,
    {"k": NAN},
    [1.0, INF],
    b"bytes",
    b"\xff",
    {1: "int key"},
    {None: "None key"},
    (1, 2),
    {1, 2},
    object(),
    datetime(2030, 1, 1, tzinfo=UTC),
    nested(MAX_DEPTH + 1),
    nested(300),
    nested(3000),
    circular(),
]


# -- arguments and context --------------------------------------------------------------


@pytest.mark.parametrize("value", NOT_JSON, ids=lambda v: type(v).__name__)
def test_a_non_json_value_in_an_untyped_argument_is_refused(retrier: Retrier, value: Any) -> None:
    @retrier.action
    def untyped(x: Any = None, payload: dict[str, Any] | None = None, items: list = []) -> None:  # type: ignore[type-arg]  # noqa: B006
        ...

    for args in ({"x": value}, {"payload": {"k": value}}, {"items": [value]}):
        with pytest.raises(InvalidArguments, match="untyped"):
            retrier.run(untyped, args)
        with pytest.raises(InvalidArguments):
            retrier.prepare(untyped, args)
    with pytest.raises(InvalidArguments, match="context"):
        retrier.run(untyped, {}, context={"k": value})
    with pytest.raises(InvalidArguments, match="context"):
        retrier.run_after(1, untyped, {}, context=value)
    assert count_runs(retrier) == 0


def test_typed_arguments_refuse_nan_bytes_that_are_not_text_and_absurd_depth(
    retrier: Retrier,
) -> None:
    class Point(BaseModel):
        x: float
        extra: Any = None

    @retrier.action
    def typed(
        ratio: float = 0.0,
        ratios: dict[str, float] | None = None,
        point: Point | None = None,
        blob: bytes = b"",
    ) -> None: ...

    for args in (
        {"ratio": NAN},
        {"ratio": INF},
        {"ratios": {"a": -INF}},
        {"point": Point(x=NAN)},
        {"point": Point(x=1, extra=[NAN])},
        {"point": {"x": 1, "extra": nested(300)}},
        {"blob": b"\xff\xfe"},
    ):
        with pytest.raises(InvalidArguments, match="typed"):
            retrier.run(typed, args)
    assert count_runs(retrier) == 0


def test_json_within_the_limits_is_stored_and_comes_back_unchanged(retrier: Retrier) -> None:
    @retrier.action
    def echo(x: Any = None) -> Any:
        return x

    @retrier.action
    def blob(data: bytes) -> bytes:
        return data

    # A value may nest MAX_DEPTH levels, counting its own: here the dict and 63 lists.
    value = {"nul": "a\x00b", "big": 2**62, "neg": -0.5, "u": "ü€😀", "deep": nested(63)}
    run_id = retrier.run(echo, {"x": value}, context={"c": nested(63)})
    text = retrier.run(blob, {"data": b"UTF-8 text"})
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success(value))
    assert retrier.store.get(run_id).context == {"c": nested(63)}
    assert retrier.status(text) == Completed(Success(b"UTF-8 text"))


# -- results ------------------------------------------------------------------------------


class Measure(BaseModel):
    value: float
    notes: Any = None


@pytest.mark.parametrize(
    "result",
    [
        {"mean": NAN},
        [INF],
        Measure(value=NAN),
        Measure(value=1, notes={"x": -INF}),
        nested(MAX_DEPTH + 2),
        object(),
    ],
    ids=["nan-in-dict", "inf-in-list", "nan-field", "inf-in-any-field", "too-deep", "object"],
)
def test_a_result_with_nan_or_that_is_not_json_fails_the_run(
    retrier: Retrier, result: Any
) -> None:
    @retrier.action
    def untyped() -> Any:
        return result

    @retrier.action
    def typed() -> Measure:
        return result  # type: ignore[no-any-return]

    for fn in (untyped, typed) if isinstance(result, Measure) else (untyped,):
        run_id = retrier.run(fn)
        drain(retrier)
        status = retrier.status(run_id)
        assert isinstance(status, Completed) and isinstance(status.result, Failed), status
        assert "not JSON-serializable" in status.result.error
        assert len(retrier.store.attempts(run_id)) == 1, "not retried"


def test_a_float_result_that_is_not_finite_fails_the_run(retrier: Retrier) -> None:
    @retrier.action
    def ratio() -> float:
        return INF

    run_id = retrier.run(ratio)
    drain(retrier)
    status = retrier.status(run_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "not JSON-serializable" in status.result.error


# -- retry settings and Retrier options -------------------------------------------------------


BAD_POLICIES: list[dict[str, Any]] = [
    {"initial_backoff_ms": 1.5},
    {"initial_backoff_ms": True},
    {"initial_backoff_ms": "250"},
    {"base": True},
    {"base": NAN},
    {"base": INF},
    {"base": "2"},
    {"max_failures": True},
    {"max_failures": 2.0},
    {"jitter": 1},
    {"jitter": "yes"},
    {"max_backoff": 60},
    {"max_backoff": timedelta(days=31)},
]


def _option_id(option: dict[str, Any]) -> str:
    ((name, value),) = option.items()
    return f"{name}={value!r}"


@pytest.mark.parametrize("bad", BAD_POLICIES, ids=_option_id)
def test_retry_settings_of_the_wrong_type_are_refused(
    retrier: Retrier, bad: dict[str, Any]
) -> None:
    @retrier.action
    def work() -> None: ...

    with pytest.raises(InvalidSettings):
        RetryPolicy(**bad)
    with pytest.raises(InvalidSettings):
        retrier.run(work, **bad)
    with pytest.raises(InvalidSettings):
        retrier.run_after(1, work, **bad)
    behavior = {"max_attempts" if k == "max_failures" else k: v for k, v in bad.items()}
    with pytest.raises(InvalidSettings):
        RetryBehavior(**behavior)
    assert count_runs(retrier) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"concurrency": 0},
        {"concurrency": True},
        {"concurrency": 1.5},
        {"lease": 30},
        {"poll_interval": timedelta(0)},
        {"poll_interval": 0.5},
        {"retention": 7},
        {"unregistered_grace": -timedelta(seconds=1)},
        {"initial_backoff_ms": 1.5},
        {"max_failures": True},
    ],
    ids=lambda b: next(iter(b)),
)
def test_retrier_options_are_checked_at_construction(db_url: str, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidSettings):
        Retrier(db_url, **bad)


def test_unknown_run_options_are_refused(retrier: Retrier) -> None:
    @retrier.action
    def work() -> None: ...

    with pytest.raises(InvalidSettings, match="max_attempts"):
        retrier.run_after(1, work, max_attempts=3)
    with pytest.raises(InvalidSettings, match="max_attempts"):
        retrier.run_at(datetime.now(UTC), work, max_attempts=3)
    assert count_runs(retrier) == 0


# -- due times ------------------------------------------------------------------------------


BAD_DELAYS: list[Any] = [
    1.8e12,  # seconds taken for milliseconds: 57,000 years
    NAN,
    INF,
    -1,
    timedelta(seconds=-1),
    CENTURY + timedelta(days=1),
    10**400,
    True,
    "5",
]
BAD_WHENS: list[Any] = [
    datetime(2030, 1, 1),  # naive
    datetime(9999, 12, 31, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    "2030-01-01T00:00:00Z",
    1_900_000_000,
]


def test_due_times_outside_the_documented_range_are_refused(retrier: Retrier) -> None:
    @retrier.action
    def work() -> None: ...

    pool = Workpool(retrier, "p")
    for delay in BAD_DELAYS:
        with pytest.raises(InvalidSettings, match="run_after"):
            retrier.run_after(delay, work)
        with pytest.raises(InvalidSettings, match="run_after"):
            pool.enqueue(work, run_after=delay)
        with pytest.raises(InvalidBatchItem) as info:
            pool.enqueue_batch([(work, {}), (work, {}, {"run_after": delay})])
        assert isinstance(info.value.__cause__, InvalidSettings)
    for when in BAD_WHENS:
        with pytest.raises(InvalidSettings, match="run_at"):
            retrier.run_at(when, work)
        with pytest.raises(InvalidSettings, match="run_at"):
            pool.enqueue(work, run_at=when)
    assert count_runs(retrier) == 0


def test_due_times_at_the_edges_of_the_range_are_accepted(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)

    @retrier.action
    def work() -> None: ...

    now = datetime.fromtimestamp(clock.now_ms() / 1000, tz=UTC)
    far = retrier.run_after(CENTURY - timedelta(days=1), work)
    past = retrier.run_at(now - timedelta(days=365), work)
    ahead_ms = (CENTURY - timedelta(days=1)) // timedelta(milliseconds=1)
    assert retrier.store.get(far).due_ms == clock.now_ms() + ahead_ms
    drain(retrier)
    assert retrier.status(past) == Completed(Success(None))


def test_retry_after_with_an_absurd_delay_is_refused() -> None:
    for seconds in (NAN, INF, -1, 1.8e12, True, "5"):
        with pytest.raises(InvalidSettings):
            RetryAfter(seconds)  # type: ignore[arg-type]
    assert str(RetryAfter(timedelta(seconds=90))) == "retry after 90 s"


# -- names ----------------------------------------------------------------------------------


def test_names_with_nul_or_too_long_are_refused(retrier: Retrier) -> None:
    @retrier.action
    def work() -> None: ...

    for bad in ("a\x00b", "x" * 201, "", 5):
        with pytest.raises(InvalidSettings):
            Workpool(retrier, bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidSettings):
            retrier.action(name=bad)(lambda: None)  # type: ignore[arg-type]
        with pytest.raises(InvalidSettings):
            retrier.on_complete(name=bad)(lambda run_id, result, context: None)  # type: ignore[arg-type]
    pool = Workpool(retrier, "p")
    for bad in ("a\x00b", "x" * 201, 5):
        with pytest.raises(InvalidSettings, match="key"):
            pool.enqueue(work, key=bad)  # type: ignore[arg-type]
    assert count_runs(retrier) == 0
    assert [q.name for q in retrier.store.list_queues()] == ["p"]


# -- workpool settings -------------------------------------------------------------------------


def test_workpool_settings_of_the_wrong_type_are_refused(retrier: Retrier) -> None:
    for bad in (
        {"max_parallelism": True},
        {"rate_limit": (10, NAN)},
        {"rate_limit": (10, INF)},
        {"rate_limit": (True, 1)},
        {"max_per_key": True},
        {"retry_actions_by_default": "no"},
        {"default_retry_behavior": {"max_attempts": 3}},
    ):
        with pytest.raises(InvalidSettings):
            Workpool(retrier, "bad", **bad)
    assert retrier.store.get_queue("bad") is None


# -- workflows ------------------------------------------------------------------------------


@pytest.fixture
def workflows(make_retrier: MakeRetrier) -> WorkflowManager:
    retrier = make_retrier(clock=FakeClock())
    return WorkflowManager(Workpool(retrier, "steps", max_parallelism=4))


def count_workflows(workflows: WorkflowManager) -> int:
    with workflows.retrier.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(workflows_t)).scalar() or 0)


def test_workflow_start_refuses_bad_arguments_context_and_key(workflows: WorkflowManager) -> None:
    @workflows.define
    async def flow(ctx: WorkflowContext, x: Any = None, ratio: float = 0) -> None: ...

    for value in (NAN, b"bytes", {1: 2}, object(), nested(MAX_DEPTH + 1)):
        with pytest.raises(InvalidArguments, match="flow"):
            workflows.start(flow, {"x": value})
        with pytest.raises(InvalidArguments, match="context"):
            workflows.start(flow, {}, context={"v": value})
    with pytest.raises(InvalidArguments):
        workflows.start(flow, {"ratio": INF})
    for key in ("a\x00b", "k" * 201, "", 7):
        with pytest.raises(InvalidSettings, match="key"):
            workflows.start(flow, {}, idempotency_key=key)  # type: ignore[arg-type]
    assert count_workflows(workflows) == 0


def test_workflow_names_leave_room_for_the_engines_prefixes(retrier: Retrier) -> None:
    with pytest.raises(InvalidSettings, match="pool"):
        WorkflowManager(Workpool(retrier, "p" * 176))
    workflows = WorkflowManager(Workpool(retrier, "p" * 175))

    async def flow(ctx: WorkflowContext) -> None: ...

    with pytest.raises(InvalidSettings, match="workflow name"):
        workflows.define(name="w" * 179)(flow)
    workflows.define(name="w" * 178)(flow)
    assert count_workflows(workflows) == 0


def test_events_refuse_nul_names_and_non_json_data(workflows: WorkflowManager) -> None:
    for name in ("a\x00b", "e" * 201, "", None):
        with pytest.raises(InvalidEvent):
            workflows.send_event(name, {})  # type: ignore[arg-type]
    for data in ({"x": NAN}, {"x": b"b"}, {1: "a"}, {"x": nested(MAX_DEPTH + 1)}, {"x": (1,)}):
        with pytest.raises(InvalidEvent, match="not JSON"):
            workflows.send_event("e", data)  # type: ignore[arg-type]
    assert issubclass(InvalidEvent, InvalidArguments)


def _failure(workflows: WorkflowManager, body: Callable[[WorkflowContext], Any]) -> str:
    @workflows.define(name=f"flow-{id(body)}")
    async def flow(ctx: WorkflowContext) -> None:
        await body(ctx)

    wf_id = workflows.start(flow)
    drain(workflows.retrier)
    status = workflows.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed), status
    return status.result.error


def test_workflow_calls_refuse_bad_durations_names_and_data(workflows: WorkflowManager) -> None:
    r = workflows.retrier

    @r.action
    def work(x: Any = None) -> None: ...

    for delay in BAD_DELAYS:
        error = _failure(workflows, lambda ctx, d=delay: ctx.sleep("nap", d))
        assert error.startswith("InvalidSettings") and "sleep" in error, error
        error = _failure(
            workflows, lambda ctx, d=delay: ctx.wait_for_event("w", "e", timeout=d)
        )
        assert error.startswith("InvalidSettings") and "timeout" in error, error
    for when in BAD_WHENS:
        error = _failure(workflows, lambda ctx, w=when: ctx.sleep_until("nap", w))
        assert error.startswith("InvalidSettings") and "sleep_until" in error, error
    for name in ("a\x00b", "s" * 191, ""):
        error = _failure(workflows, lambda ctx, n=name: ctx.step(n, work))
        assert error.startswith("InvalidArguments"), error
        error = _failure(workflows, lambda ctx, n=name: ctx.patched(n))
        assert error.startswith("InvalidArguments") and "patch name" in error, error
        error = _failure(workflows, lambda ctx, n=name: ctx.deprecate_patch(n))
        assert error.startswith("InvalidArguments") and "patch name" in error, error
    error = _failure(workflows, lambda ctx: ctx.step("s", work, {"x": NAN}))
    assert error.startswith("InvalidArguments"), error
    error = _failure(workflows, lambda ctx: ctx.step("s", work, retry="yes"))
    assert error.startswith("InvalidSettings") and "retry" in error, error
    error = _failure(workflows, lambda ctx: ctx.wait_for_event("w", "e", match={"k": NAN}))
    assert error.startswith("InvalidArguments") and "match" in error, error
    error = _failure(workflows, lambda ctx: ctx.wait_for_event("w", "a\x00b"))
    assert error.startswith("InvalidEvent"), error
    error = _failure(workflows, lambda ctx: ctx.send_event("s", "e", {"x": INF}))
    assert error.startswith("InvalidEvent"), error
    with r.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tiers_workflow_events")).scalar() == 0


def test_a_workflow_result_with_nan_fails_the_workflow(workflows: WorkflowManager) -> None:
    @workflows.define
    async def averages(ctx: WorkflowContext) -> dict[str, float]:
        return {"mean": NAN}

    wf_id = workflows.start(averages)
    drain(workflows.retrier)
    status = workflows.status(wf_id)
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "not JSON-serializable" in status.result.error


def test_every_new_error_shares_the_root() -> None:
    import retrier

    for name in ("DatabaseUnavailable", "DatabaseBusy", "SchemaMissing"):
        assert issubclass(getattr(retrier, name), TiersError) and name in retrier.__all__
