"""When another process announces new runs (a NOTIFY, a local ping), whether this
worker should claim, and how soon.

Every worker hears every announcement; if each claimed at once, N idle workers would
spend N claims on each new run, all but one finding nothing. So: a worker whose
record is about to run (or running) lets that record's refill take the new runs; an
idle worker claims at once while its claims find work, and backs off (1 ms, doubling
to 20 ms; announcements meanwhile are folded into one claim) while they find none,
because another worker is winning the race.
"""

from __future__ import annotations

_FIRST_BACKOFF_S = 0.001
_LAST_BACKOFF_S = 0.02


class Hints:
    """The state behind a worker's answer to announcements of new runs."""

    def __init__(self) -> None:
        self.recording = False  # a record-and-refill transaction is under way
        self._missed = False  # new runs were announced during it
        self._claim_pending = False  # the next claim answers an announcement
        self._backoff = 0.0

    def announced(self, outcomes_waiting: bool) -> bool:
        """New runs were announced: whether to wake the claim loop for them."""
        if self.recording:
            self._missed = True  # it may have claimed before they were committed
            return False
        if outcomes_waiting:
            return False  # the coming record claims after they were committed
        self._claim_pending = True
        return True

    def record_done(self, outcomes_waiting: bool) -> bool:
        """A record ended: whether runs announced during it still need a claim."""
        missed, self._missed = self._missed, False
        if missed and not outcomes_waiting:
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
