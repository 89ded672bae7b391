"""The engine's declared interface: everything a higher tier may use, and nothing else.

`workpool` and `workflow` are built on these names only (never on `retrier._*`); a
third-party tier or tool should do the same. What is here is stable within a minor
release; what is not here is private and may change at any time.

The layers, from the bottom:

- the Dialect (`_dialects`): the only code that knows which database it talks to;
- the Store (`_store`, with its parts `_claims`, `_limits`, `_records`, `_upkeep`,
  `_reads`): every read and write of the engine's tables, as short transactions;
- the Worker (`_worker`): claims, executes, records and delivers, with its timers;
- the Retrier (`_retrier`): tier 1's public API, and the facade higher tiers hold.

Higher tiers write their own tables in the Store's transactions (the `conn` taken by
`insert_running`, `record_in`, `ensure_pending`, ...), so their state and the
engine's commit together.
"""

from __future__ import annotations

from ._checks import (
    MAX_ATTEMPT_TIMEOUT,
    MAX_NAME,
    check_flag,
    check_name,
    check_timeout,
    format_limit,
)
from ._cli import Context as CliContext
from ._cli import console, format_ms, or_exit, print_listing, print_why, shorten
from ._clock import MAX_AHEAD, delay_ms, due_ms, ms_to_datetime, to_ms
from ._compiled import CompiledQuery, CompiledWrite, on_cursor
from ._dialects import Dialect, is_transient, partial_index
from ._errors import describe as describe_error
from ._errors import format_size
from ._explain import Why
from ._ids import new_id
from ._json import check_json, check_size, json_size
from ._keyed import Debounced
from ._keys import check_debounce, check_idempotency_key, check_once, renamed_key
from ._models import (
    CANCELED,
    COMPLETED,
    DELIVERING,
    FAILED,
    FINISHING,
    PENDING,
    RUNNING,
    SUCCESS,
    RunRow,
)
from ._registry import (
    Fn,
    Registered,
    Registry,
    ResultNotSerializable,
    default_name,
    return_hint,
)
from ._registry import describe as describe_function
from ._retrier import retrier_of
from ._run_types import (
    ANYTHING,
    Claimed,
    Delivery,
    GroupMember,
    NewRun,
    Outcome,
    OwnedRun,
    QueueGroup,
    QueueLimits,
    Recorded,
    Runnable,
    SessionHandler,
    StoredOutcome,
)
from ._run_waits import all_reached
from ._schedules import Schedule, ScheduleSpec
from ._scheduling import schedule_spec
from ._store import Store, claimed_inline, running_values
from ._stored_json import CorruptValue, StoredJSON, unreadable
from ._waiting import Changes, poll_until, poll_until_async
from ._worker import Worker, current_worker

__all__ = [
    "ANYTHING",
    "CANCELED",
    "COMPLETED",
    "DELIVERING",
    "FAILED",
    "FINISHING",
    "MAX_AHEAD",
    "MAX_ATTEMPT_TIMEOUT",
    "MAX_NAME",
    "PENDING",
    "RUNNING",
    "SUCCESS",
    "Changes",
    "Claimed",
    "CliContext",
    "CompiledQuery",
    "CompiledWrite",
    "CorruptValue",
    "Debounced",
    "Delivery",
    "Dialect",
    "Fn",
    "GroupMember",
    "NewRun",
    "Outcome",
    "OwnedRun",
    "QueueGroup",
    "QueueLimits",
    "Recorded",
    "Registered",
    "Registry",
    "ResultNotSerializable",
    "RunRow",
    "Runnable",
    "Schedule",
    "ScheduleSpec",
    "SessionHandler",
    "Store",
    "StoredJSON",
    "StoredOutcome",
    "Why",
    "Worker",
    "all_reached",
    "check_debounce",
    "check_flag",
    "check_idempotency_key",
    "check_json",
    "check_name",
    "check_once",
    "check_size",
    "check_timeout",
    "claimed_inline",
    "console",
    "current_worker",
    "default_name",
    "delay_ms",
    "describe_error",
    "describe_function",
    "due_ms",
    "format_limit",
    "format_ms",
    "format_size",
    "is_transient",
    "json_size",
    "ms_to_datetime",
    "new_id",
    "on_cursor",
    "or_exit",
    "partial_index",
    "poll_until",
    "poll_until_async",
    "print_listing",
    "print_why",
    "renamed_key",
    "retrier_of",
    "return_hint",
    "running_values",
    "schedule_spec",
    "shorten",
    "to_ms",
    "unreadable",
]
