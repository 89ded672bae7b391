"""The library's exceptions: one root, one subclass per problem a user can act on."""

from __future__ import annotations


class TiersError(Exception):
    """Root of every error raised by durable-tiers."""


class RunNotFound(TiersError, LookupError):
    """No run with this id is stored (it never existed, or it was cleaned up)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}")
        self.run_id = run_id


class RunNotFinished(TiersError):
    """The run is still in progress, so its state cannot be cleaned up yet."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} has not finished; cancel it or wait for it first")
        self.run_id = run_id


class RunNotRetryable(TiersError):
    """Only a run that has failed, and is not a workflow's, can be retried by hand."""

    def __init__(self, run_id: str, why: str) -> None:
        super().__init__(f"run {run_id!r} cannot be retried: {why}")
        self.run_id = run_id


class UnregisteredFunction(TiersError, LookupError):
    """A function was used (or named by a stored row) that is not registered."""

    def __init__(self, name: str, kind: str = "action") -> None:
        super().__init__(
            f"{kind} {name!r} is not registered; decorate it with @retrier.{kind} "
            f"in the module the worker imports"
        )
        self.name = name


class DuplicateRegistration(TiersError, ValueError):
    """Two different functions were registered under one name."""


class InvalidArguments(TiersError, ValueError):
    """The arguments given for a function do not match its signature."""


class ValueTooLarge(InvalidArguments):
    """A value is larger, as stored JSON, than its documented limit (an argument, a
    result, event data, progress). Raised before anything is written."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what} is {format_size(size)} as JSON, over the limit of {format_size(limit)}"
        )
        self.what = what
        self.size = size
        self.limit = limit


def format_size(size: int) -> str:
    """Bytes for people: 812 B, 64 KiB, 1.5 MiB."""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.4g} KiB"
    return f"{size / (1024 * 1024):.4g} MiB"


class InvalidSettings(TiersError, ValueError):
    """A retry policy, pool setting or other option is negative or absurd."""


class InvalidSchedule(InvalidSettings):
    """A schedule's cron expression, time zone or missed-tick policy is wrong (or
    the expression never fires); raised before anything is written."""


class ScheduleNotFound(TiersError, LookupError):
    """No schedule with this name is stored."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no schedule named {name!r}")
        self.name = name


class InvalidDatabaseURL(TiersError, ValueError):
    """The database URL cannot be parsed or names an unsupported backend.

    The message shows the URL with its password masked (``u:***@host``).
    """


class DatabaseUnavailable(TiersError):
    """The database cannot be used: the server is unreachable or refuses the login,
    the SQLite file cannot be opened, or the database does not exist.

    The message says why in one line, with the URL's password masked.
    """


class DatabaseBusy(DatabaseUnavailable):
    """The database stayed locked by other writers past the wait allowed (SQLite's
    busy timeout, 30 s; PostgreSQL's ``lock_timeout`` if one is set). Nothing was
    written; the call may be retried."""


class SchemaMissing(TiersError):
    """The database has no durable-tiers tables (or lacks a tier's tables): it was
    never opened by a `Retrier` (a `Workpool`, a `WorkflowManager`), which creates
    them."""


class SchemaTooNew(TiersError):
    """The database was written by a newer durable-tiers than this one."""

    def __init__(self, found: int | str, known: int | str) -> None:
        super().__init__(
            f"the database schema is version {found}, but this durable-tiers only knows "
            f"versions up to {known}; upgrade durable-tiers before using this database"
        )
        self.found = found
        self.known = known


class WaitTimeout(TiersError, TimeoutError):
    """`wait` gave up before the run completed."""

    def __init__(self, run_id: str, timeout: float) -> None:
        super().__init__(f"run {run_id!r} did not complete within {timeout:g} s")
        self.run_id = run_id


class NonRetryableError(Exception):
    """Raise from an action to fail its run at once, without further retries."""


class RetryAfter(Exception):
    """Raise from an action to retry after `seconds` instead of the computed backoff.

    The attempt still counts as a failure toward `max_failures`.
    """

    def __init__(self, seconds: float, message: str = "") -> None:
        from ._clock import delay_ms  # _clock imports this module

        # Finite, not negative, within the due-time range (else InvalidSettings).
        ms = delay_ms(seconds, "RetryAfter")
        super().__init__(message or f"retry after {ms / 1000:g} s")
        self.seconds = seconds


class HandBack(Exception):
    """Raise from an action to hand its run back, to be run again after `seconds` by
    this or another worker, without counting an attempt or a failure.

    For a worker that cannot run this particular run (say, a workflow whose code
    it lacks in a rolling deploy); not for failures, which retries handle.
    """

    def __init__(self, seconds: float = 1.0, reason: str = "") -> None:
        if not 0 <= seconds <= 3600:
            raise InvalidSettings(f"HandBack needs a delay from 0 to 3600 s, got {seconds}")
        super().__init__(reason or f"handed back for {seconds:g} s")
        self.seconds = seconds


def describe(exc: BaseException) -> str:
    """`Type: message`, as stored for a failed attempt or handler. A NUL character
    (which PostgreSQL's text columns refuse) is written as `\\x00`."""
    return f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00")


def first_line(exc: BaseException) -> str:
    """`Type: the first line of its message`, for a log line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
