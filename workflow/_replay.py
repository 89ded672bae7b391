"""The rule that proves a workflow's code changed under a replay, before anything new runs.

A journal records each call of a workflow at its *position* (its index in call order).
A replay consumes the journal as the code makes its calls. The journal proves the code
changed, and the replay diverges, when:

1. a call is **new** (its name and occurrence are not journaled) while the journal holds
   an entry not consumed yet at the same or an earlier position: the old code made a
   different call there. Checked when the call is *made*, so nothing new runs;
2. a journaled call is reached while an entry at an earlier position was never
   consumed: the old code made a call there that this code no longer makes;
3. the workflow function returns while the journal holds entries the replay never
   reached (code that raises ends the workflow with its own error).

A new call whose position lies before every unconsumed entry is not a divergence: a
`gather` of several new calls may have journaled a later one before an earlier one
(the earlier one's write was lost), and the earlier one simply runs now.

Patch markers (`ctx.patched`) are outside the rule: a marker that no call consumes is
ignored (so `deprecate_patch` and then the call itself may be removed).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._journal_reads import Entry
from ._models import PATCH


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where a replay left its journal: the journal's entry there, and what the code did."""

    step: str
    expected: str
    found: str
    detail: str


def describe_entry(entry: Entry) -> str:
    """How a journal entry reads in a divergence report: `step 'charge[0]' (app.charge)`."""
    fn = f" ({entry.fn})" if entry.fn and entry.kind == "step" else ""
    return f"{entry.kind} {entry.name!r}{fn}"


class Replay:
    """Which journal entries a replay has not consumed yet, by position."""

    def __init__(self, entries: dict[str, Entry]) -> None:
        self._pending: dict[int, list[Entry]] = {}
        for e in entries.values():
            if e.kind != PATCH:
                self._pending.setdefault(e.position, []).append(e)

    def _first(self, at_most: int | None = None) -> Entry | None:
        positions = [p for p in self._pending if at_most is None or p <= at_most]
        if not positions:
            return None
        return min(self._pending[min(positions)], key=lambda e: e.name)

    @property
    def unconsumed(self) -> bool:
        """Whether the old code journaled calls this replay has not reached yet."""
        return bool(self._pending)

    def consume(self, entry: Entry) -> Divergence | None:
        """A journaled call was reached (rule 2)."""
        skipped = self._first(entry.position - 1)
        self._pending.pop(entry.position, None)
        if skipped is None:
            return None
        return Divergence(
            skipped.name,
            describe_entry(skipped),
            describe_entry(entry),
            f"the journal has {describe_entry(skipped)} before {entry.name!r}, "
            f"which this code no longer calls",
        )

    def new_call(self, kind: str, full: str, position: int) -> Divergence | None:
        """A call not in the journal is about to be made at `position` (rule 1)."""
        ahead = self._first(position)
        if ahead is None:
            return None
        return Divergence(
            ahead.name,
            describe_entry(ahead),
            f"{kind} {full!r}",
            f"the journal has {describe_entry(ahead)} there, the code makes a new {kind} {full!r}",
        )

    def ended(self) -> Divergence | None:
        """The workflow function ended (rule 3)."""
        left = self._first()
        if left is None:
            return None
        return Divergence(
            left.name,
            describe_entry(left),
            "the end of the workflow",
            f"the workflow ended before reaching {describe_entry(left)}, which its journal has",
        )
