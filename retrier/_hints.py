"""When another process announces new runs (a NOTIFY, a local ping), whether this
worker should claim, and how soon; and whether it wants to hear of them at all.

Every worker hears every announcement; if each claimed at once, N idle workers would
spend N claims on each new run, all but one finding nothing. So: a worker whose
record is about to run (or running) lets that record's refill take the new runs; an
idle worker claims at once while its claims find work, and backs off (1 ms, doubling
to 20 ms; announcements meanwhile are folded into one claim) while they find none,
because another worker is winning the race.

Where an announcement says when it was sent (SQLite's pings carry the machine's
monotonic time, taken after the commit), one sent before this worker's latest claim
began needs nothing: that claim (or a record's refill) saw its runs, and took them or
left them for a reason a new claim would find again (a full pool, a worker at
capacity whose records will refill). Under a flood of enqueues this keeps a worker
from answering each one with a claim of its own.

Where an announcement costs enough to be sent only to workers that want one
(PostgreSQL's NOTIFY, `_pg_wants`), `wants_announcements` says whether a worker does.
"""

from __future__ import annotations

import math

# When an announcement was sent, as a time.monotonic() value: UNKNOWN where it does
# not say (seen by no claim), NONE for "no announcement" (before any).
UNKNOWN = math.inf
NONE = -math.inf

_FIRST_BACKOFF_S = 0.001
_LAST_BACKOFF_S = 0.02

# A worker that recorded outcomes this recently, with runs still in flight, expects
# another record soon, whose refill claims what is due: it needs no announcements.
CYCLING_S = 0.005


def wants_announcements(
    held: int, concurrency: int, stopping: bool, since_record: float
) -> tuple[bool, float | None]:
    """Whether a worker wants to hear of new runs (`Dialect.announcement_wants`), and
    in how many seconds to ask again (None: at its next record or release).

    Not if it cannot take them (stopping, or no free slot), nor while a record coming
    soon will: it holds runs and recorded outcomes under `CYCLING_S` ago; then it
    asks again once that is past."""
    free = not stopping and held < concurrency
    cycling = held > 0 and since_record < CYCLING_S
    return free and not cycling, (CYCLING_S - since_record if free and cycling else None)


class Hints:
    """The state behind a worker's answer to announcements of new runs."""

    def __init__(self) -> None:
        self.recording = False  # a record-and-refill transaction is under way
        self._missed_at = NONE  # when the latest announcement during it was sent
        self._claim_pending = False  # the next claim answers an announcement
        self._backoff = 0.0
        self.looked_at = 0.0  # when the latest claim that saw every due run began

    def covers(self, sent_at: float) -> bool:
        """Whether an announcement sent at `sent_at` (UNKNOWN: it does not say) was
        seen already."""
        return sent_at < self.looked_at

    def looked(self, began_at: float) -> None:
        """A claim (or a record's refill) that began at `began_at` has committed."""
        self.looked_at = max(self.looked_at, began_at)

    def announced(self, outcomes_waiting: bool, sent_at: float = UNKNOWN) -> bool:
        """New runs were announced: whether to wake the claim loop for them."""
        if self.covers(sent_at):
            return False
        if self.recording:
            # It may have claimed before they were committed.
            self._missed_at = max(self._missed_at, sent_at)
            return False
        if outcomes_waiting:
            return False  # the coming record claims after they were committed
        self._claim_pending = True
        return True

    def record_done(self, outcomes_waiting: bool) -> bool:
        """A record ended: whether runs announced during it still need a claim."""
        missed_at, self._missed_at = self._missed_at, NONE
        if missed_at > NONE and not self.covers(missed_at) and not outcomes_waiting:
            self._claim_pending = True
            return True
        return False

    def delay(self) -> float:
        """How long to wait before a claim that answers an announcement."""
        return self._backoff if self._claim_pending else 0.0

    def claimed(self, count: int) -> None:
        """A claim took `count` runs."""
        if not self._claim_pending:
            return
        self._claim_pending = False
        if count:
            self._backoff = 0.0
        else:
            self._backoff = min(max(self._backoff * 2, _FIRST_BACKOFF_S), _LAST_BACKOFF_S)
