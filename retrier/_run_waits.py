"""What a wait for runs polls: whether they have all completed (read a slice at a
time), and, for a wait that nothing may ever end, a warning once no live worker has
been seen for a while."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import TypeVar

from ._clock import ms_to_datetime
from ._errors import RunNotFound
from ._models import COMPLETED
from ._store import Store

log = logging.getLogger("tiers")

# How many runs (or workflows) a wait reads the state of at a time: the first slice,
# then twice as many each time a slice is all done, up to the last.
_FIRST_SLICE = 8
_WAIT_SLICE = 200
R = TypeVar("R")


def all_completed(store: Store, remaining: set[str]) -> bool | None:
    """True once every run in `remaining` has completed; removes those that have."""
    return all_reached(remaining, store.states, {COMPLETED}, RunNotFound)


def all_reached(
    remaining: set[str],
    states_of: Callable[[list[str]], dict[str, str]],
    final: Collection[str],
    not_found: Callable[[str], Exception],
) -> bool | None:
    """True once every id in `remaining` is in one of the `final` states (read with
    `states_of`); removes those that are. An id `states_of` does not know raises
    `not_found(id)`.

    Reads a slice at a time, and stops at the first slice with one still going: a wait
    for thousands then costs one short read per look, not one of everything left. The
    slices start small and double while they are all done: a wait for hundreds, woken
    as each one ends, reads a few rows per look until most have ended.
    """
    ordered = sorted(remaining)
    start, size = 0, _FIRST_SLICE
    while start < len(ordered):
        chunk = ordered[start : start + size]
        states = states_of(chunk)
        for missing in set(chunk) - states.keys():
            raise not_found(missing)
        done = {i for i, state in states.items() if state in final}
        remaining.difference_update(done)
        if len(done) < len(chunk):
            return None
        start, size = start + size, min(size * 2, _WAIT_SLICE)
    return True


def warn_when_unserved(
    check: Callable[[], R | None], after_s: float, warn: Callable[[float], None]
) -> Callable[[], R | None]:
    """`check`, which calls `warn(waited_s)` once, the first time it finds nothing
    after `after_s` seconds."""
    began = time.monotonic()
    warned = False

    def watched_check() -> R | None:
        nonlocal warned
        found = check()
        waited = time.monotonic() - began
        if found is None and not warned and waited >= after_s:
            warned = True
            warn(waited)
        return found

    return watched_check


def warn_if_no_worker(store: Store, waited_s: float) -> None:
    """Log a warning if no live worker is registered in the database."""
    seen = store.workers_seen()
    if seen.live:
        return
    since = (
        f"since {ms_to_datetime(seen.last_heartbeat_ms):%Y-%m-%d %H:%M:%S} UTC"
        if seen.last_heartbeat_ms is not None
        else "since this wait began"
    )
    log.warning(
        "waited %.0f s, and no live worker has registered %s: start one with "
        "`tiers worker MODULE:ATTR` (your Retrier, Workpool or WorkflowManager) or "
        "`with retrier:`",
        waited_s, since,
    )
