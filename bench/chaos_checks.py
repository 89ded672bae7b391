"""The checks of `bench.chaos`, computed from the database and the pool's records.

Each check returns a `Check`: a number, its limit, and a few offending ids as
evidence. What at-least-once execution allows is spelled out beside each check: a
worker killed mid-action legitimately makes its run execute again (the lost attempt
counts as a failure); nothing else may repeat.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from bench.chaos_app import MAX_ATTEMPTS, MAX_FAILURES, STEP_CAP, STEP_POOL, WORKFLOW_STEPS

FINISHED_WORKFLOW = ("completed", "failed", "canceled")
NOT_A_FAILURE = ("released", "canceled")  # attempt outcomes the policy does not count
RERUN_SLACK_US = 1_000  # the journal's finished_ms is truncated to the millisecond


@dataclass(frozen=True)
class Expected:
    """What the harness enqueued."""

    runs: dict[str, int] = field(default_factory=dict)  # run id -> n
    items: dict[str, int] = field(default_factory=dict)  # work id -> item
    workflows: dict[str, str] = field(default_factory=dict)  # workflow id -> label


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    limit: str
    ok: bool
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class Attempt:
    run_id: str
    outcome: str
    pid: int | None
    started_ms: int
    finished_ms: int


@dataclass
class Snapshot:
    """Everything the checks read, loaded once after the workers stopped."""

    runs: dict[str, Any]
    attempts: dict[str, list[Attempt]]
    completions: Counter[str]
    duplicates: list[Any]
    effects: dict[str, list[Any]]
    workflows: dict[str, str]
    workflow_errors: dict[str, str]
    journal: dict[tuple[str, str], Any]

    def lost_attempts(self, run_id: str | None) -> int:
        return sum(1 for a in self.attempts.get(run_id or "", []) if a.outcome == "lost")

    def state_of(self, run_id: str) -> str:
        row = self.runs.get(run_id)
        if row is None:
            return "no run"
        delivered = "delivered" if self.completions[run_id] else "not delivered"
        return f"{row.state}, {delivered}"

    def delivered(self, run_id: str) -> bool:
        row = self.runs.get(run_id)
        return row is not None and row.state == "completed" and self.completions[run_id] > 0


def read_snapshot(engine: Engine) -> Snapshot:
    with engine.connect() as conn:
        def rows(sql: str) -> Sequence[Any]:
            return conn.execute(text(sql)).all()

        runs = {r.id: r for r in rows(
            "SELECT id, fn, state, outcome, max_failures, handler_error, queue FROM tiers_runs")}
        attempts: dict[str, list[Attempt]] = defaultdict(list)
        for a in rows("SELECT run_id, outcome, worker, started_ms, finished_ms "
                      "FROM tiers_attempts"):
            attempts[a.run_id].append(
                Attempt(a.run_id, a.outcome, worker_pid(a.worker), a.started_ms, a.finished_ms))
        flows = rows("SELECT id, state, error FROM tiers_workflows")
        effects: dict[str, list[Any]] = defaultdict(list)
        for e in rows("SELECT kind, key, outcome, pid, started_us FROM chaos_effects"):
            effects[e.key].append(e)
        return Snapshot(
            runs=runs,
            attempts=attempts,
            completions=Counter(r.run_id for r in rows("SELECT run_id FROM chaos_completions")),
            duplicates=list(rows("SELECT run_id, outcome, pid FROM chaos_duplicates")),
            effects=effects,
            workflows={r.id: r.state for r in flows},
            workflow_errors={r.id: r.error or "" for r in flows},
            journal={(r.workflow_id, r.name): r for r in rows(
                "SELECT workflow_id, name, state, run_id, finished_ms "
                "FROM tiers_workflow_steps WHERE kind = 'step'")},
        )


def worker_pid(worker: str | None) -> int | None:
    """The pid in a worker id "host:pid:suffix"."""
    if not worker:
        return None
    try:
        return int(worker.rsplit(":", 2)[1])
    except (IndexError, ValueError):
        return None


def _check(name: str, bad: Sequence[str], limit: str = "0", value: str | None = None,
           ok: bool | None = None) -> Check:
    return Check(name, value if value is not None else str(len(bad)), limit,
                 not bad if ok is None else ok, tuple(bad[:5]))


# -- the checks --------------------------------------------------------------------------


def runs_lost(snap: Snapshot, expected: Expected) -> Check:
    """Every run, item and workflow finished and its on_complete committed."""
    runs = [f"run {n} {i} ({snap.state_of(i)})"
            for i, n in expected.runs.items() if not snap.delivered(i)]
    items = [f"item {n} {i} ({snap.state_of(i)})"
             for i, n in expected.items.items() if not snap.delivered(i)]
    workflows = [
        f"workflow {expected.workflows[i]} {i} (workflow {snap.workflows.get(i, 'missing')}, "
        f"its on_complete run {snap.state_of(i)})"
        for i in lost_workflows(snap, expected)
    ]
    bad = [*runs, *items, *workflows]
    return _check("runs lost (runs / items / workflows)", bad,
                  value=f"{len(runs)} / {len(items)} / {len(workflows)}")


def duplicate_deliveries(snap: Snapshot) -> Check:
    """The session on_complete committed at most once per run: a second delivery that
    committed wrote chaos_duplicates; one that raced the first failed on UNIQUE(run_id)
    (its error is kept on the run, and its retry writes chaos_duplicates)."""
    bad = [f"{d.run_id} (again, in pid {d.pid})" for d in snap.duplicates]
    bad += [f"{run_id} (handler error: {row.handler_error[:80]})"
            for run_id, row in snap.runs.items()
            if row.handler_error and _is_unique_violation(row.handler_error)]
    return _check("duplicate exactly-once effects", bad)


def _is_unique_violation(error: str) -> bool:
    lowered = error.lower()
    return "unique" in lowered or "integrityerror" in lowered


def attempts_over_policy(snap: Snapshot, item_starts: dict[int, int]) -> Check:
    """No run was attempted more often than its max_failures allows: counted from the
    engine's attempts (lost ones included) and from the effects the actions wrote."""
    bad = []
    for run_id, row in snap.runs.items():
        counted = sum(1 for a in snap.attempts.get(run_id, []) if a.outcome not in NOT_A_FAILURE)
        if counted > row.max_failures:
            bad.append(f"run {run_id}: {counted} attempts, max_failures {row.max_failures}")
    for key, rows in snap.effects.items():
        limit = MAX_FAILURES if key.startswith("run/") else MAX_ATTEMPTS
        if len(rows) > limit:
            bad.append(f"{key}: {len(rows)} executions, at most {limit} attempts")
    for item, starts in item_starts.items():
        if starts > MAX_ATTEMPTS:
            bad.append(f"item {item}: {starts} executions, at most {MAX_ATTEMPTS} attempts")
    return _check("attempts over the policy", bad)


def stuck(snap: Snapshot) -> tuple[Check, Check]:
    """After the drain and a graceful stop, nothing is leased and nothing is left due."""
    leased = [f"{i} ({r.state}, {r.fn})" for i, r in snap.runs.items()
              if r.state in ("running", "delivering")]
    left = [f"{i} ({r.state}, {r.fn})" for i, r in snap.runs.items()
            if r.state in ("pending", "finishing")]
    return (_check("stuck leases (running / delivering)", leased),
            _check("unfinished runs (pending / finishing)", left))


def workflows_failed_by_engine(snap: Snapshot, expected: Expected) -> Check:
    """A workflow may fail only as its code says: here, a step that exhausted its
    attempts (StepFailed). The body does nothing else that can raise, so any other
    error (a database error from a journal write, say) is the engine failing a
    durable workflow for good over something it should have retried."""
    bad = [f"workflow {label} {wf_id}: {snap.workflow_errors.get(wf_id, '')[:120]}"
           for wf_id, label in expected.workflows.items()
           if snap.workflows.get(wf_id) == "failed"
           and not snap.workflow_errors.get(wf_id, "").startswith("StepFailed")]
    return _check("workflows failed by an engine error", bad)


def steps_rerun_after_journaled(snap: Snapshot, expected: Expected) -> Check:
    """No step's action began after the journal recorded the step's result. (A step
    whose worker died mid-action runs again, but it began before the journal entry.)"""
    bad = []
    for wf_id, label in expected.workflows.items():
        for step in range(WORKFLOW_STEPS):
            entry = snap.journal.get((wf_id, f"s{step}[0]"))
            if entry is None or entry.finished_ms is None:
                continue
            for e in snap.effects.get(f"{label}/{step}", []):
                late_us = e.started_us - entry.finished_ms * 1000
                if late_us > RERUN_SLACK_US:
                    bad.append(f"{label} s{step}: began {late_us / 1000:.1f} ms after its "
                               f"journal entry (pid {e.pid})")
    return _check("steps re-run after being journaled", bad)


def beyond_at_least_once(snap: Snapshot, expected: Expected,
                         item_ends: dict[int, int]) -> Check:
    """An action reaches success once, plus once per lost attempt of its run (a worker
    killed after the action, before its outcome was stored). More is a re-execution
    the engine did not account for."""
    bad = []

    def judge(what: str, successes: int, run_id: str | None) -> None:
        allowed = 1 + snap.lost_attempts(run_id)
        if successes > allowed:
            bad.append(f"{what}: {successes} successful executions, {allowed} allowed")

    for run_id, n in expected.runs.items():
        judge(f"run {n}", _oks(snap.effects.get(f"run/{n}", [])), run_id)
    for wf_id, label in expected.workflows.items():
        for step in range(WORKFLOW_STEPS):
            entry = snap.journal.get((wf_id, f"s{step}[0]"))
            judge(f"{label} s{step}", _oks(snap.effects.get(f"{label}/{step}", [])),
                  entry.run_id if entry is not None else None)
    for work_id, item in expected.items.items():
        judge(f"item {item}", item_ends.get(item, 0), work_id)
    return _check("executions beyond at-least-once", bad)


def _oks(rows: Iterable[Any]) -> int:
    return sum(1 for r in rows if r.outcome == "ok")


# -- the pool's overlap ---------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    item: int
    pid: int
    start: int  # ns
    end: int  # ns: the recorded end, or when its process was seen dead
    closed: bool  # the action recorded its end


@dataclass
class PoolRecords:
    intervals: list[Interval]
    starts: dict[int, int]  # item -> attempts that began the action
    ends: dict[int, int]  # item -> attempts that reached the end successfully
    open_in_live_workers: list[str]


def read_pool_records(record_dir: Path, ended_ns: dict[int, int], end_ns: int) -> PoolRecords:
    """The capped pool's intervals. An attempt killed mid-action has a start and no end:
    it ends when its process was seen dead (or at `end_ns` if it never died)."""
    intervals: list[Interval] = []
    starts: dict[int, int] = defaultdict(int)
    ends: dict[int, int] = defaultdict(int)
    never_ended: list[str] = []
    for path in record_dir.iterdir():
        item = int(path.name)
        open_starts: dict[int, list[int]] = defaultdict(list)
        for line in path.read_text().splitlines():
            what, pid_text, ns_text = line.split()
            pid, ns = int(pid_text), int(ns_text)
            if what == "start":
                starts[item] += 1
                open_starts[pid].append(ns)
                continue
            ends[item] += what == "end"
            intervals.append(Interval(item, pid, open_starts[pid].pop(0), ns, True))
        for pid, pending in open_starts.items():
            for start in pending:
                if pid not in ended_ns:
                    never_ended.append(f"item {item} in pid {pid}")
                intervals.append(Interval(item, pid, start, ended_ns.get(pid, end_ns), False))
    return PoolRecords(intervals, starts, ends, never_ended)


def max_overlap(spans: Iterable[tuple[int, int]]) -> int:
    """The most half-open intervals [start, end) covering one instant."""
    events = sorted(e for s, t in spans for e in ((s, 1), (t, -1)))  # ends sort first
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def slot_spans(records: PoolRecords, snap: Snapshot, expected: Expected) -> list[tuple[int, int]]:
    """Each attempt's interval, extended to when the engine freed its slot: an attempt
    the engine lost (its worker killed, or its outcome unrecorded) holds its slot until
    its lease is reaped, which the lost attempt's finished_ms stamps (read before the
    reaping commits, so never after the slot is really free).

    A lost attempt's own interval is its worker's interval of the item that began at
    or after the attempt's started_ms (the action starts after its claim stamps it, or
    waits for it; a millisecond of slack for the stamp's rounding), never an earlier
    attempt's of the same worker, whose slot was freed when that attempt failed (at
    least a backoff before). A worker killed between its claim and its action's start
    left no interval: its slot was held from the claim to the reaping all the same, a
    span from started_ms (less its first millisecond, so never longer than the hold)."""
    run_of = {item: work_id for work_id, item in expected.items.items()}
    by_key: dict[tuple[int, int], list[int]] = defaultdict(list)  # (item, pid) -> indexes
    ordered = sorted(records.intervals, key=lambda i: i.start)
    for index, interval in enumerate(ordered):
        by_key[(interval.item, interval.pid)].append(index)
    spans = [(i.start, i.end) for i in ordered]
    for item, work_id in run_of.items():
        for a in snap.attempts.get(work_id, []):
            if a.outcome != "lost" or a.pid is None:
                continue
            began, reaped = (a.started_ms - 1) * 1_000_000, a.finished_ms * 1_000_000
            own = [j for j in by_key[(item, a.pid)] if began <= ordered[j].start <= reaped]
            if own:
                start, end = spans[own[0]]
                spans[own[0]] = (start, max(end, reaped))
            elif a.finished_ms - 1 > a.started_ms:
                spans.append(((a.started_ms + 1) * 1_000_000, reaped))
    return spans


def pool_overlap(records: PoolRecords, snap: Snapshot, expected: Expected,
                 cap: int) -> tuple[Check, Check]:
    actions = max_overlap((i.start, i.end) for i in records.intervals)
    slots = max_overlap(slot_spans(records, snap, expected))
    return (
        _check("pool max overlap, actions running", [], limit=f"<= {cap}",
               value=str(actions), ok=actions <= cap),
        _check("pool max overlap, slots held (to lease reap)", records.open_in_live_workers,
               limit=f"<= {cap}", value=str(slots), ok=slots <= cap),
    )


def step_pool_overlap(snap: Snapshot) -> Check:
    """The workflow steps' pool, by the engine's own stamps: its attempts' spans
    overlap at most its cap. An inline step's start takes over the slot of the step
    it completes without locking the pool (`tiers_step_v2`); a lost attempt's span
    ends when its lease was reaped. Each span loses its last millisecond (stamps are
    whole milliseconds, an end rounded up), so this is the cap's necessary condition,
    never a false alarm; the attempts lie inside the slots' real spans."""
    spans = [
        (a.started_ms, a.finished_ms - 1)
        for run_id, row in snap.runs.items() if row.queue == STEP_POOL
        for a in snap.attempts.get(run_id, []) if a.finished_ms - 1 > a.started_ms
    ]
    most = max_overlap(spans)
    return _check("steps' pool max overlap, attempts (engine stamps)", [],
                  limit=f"<= {STEP_CAP}", value=str(most), ok=most <= STEP_CAP)


# -- facts (not pass/fail) ----------------------------------------------------------------


def outcome_counts(snap: Snapshot, ids: Iterable[str]) -> str:
    counts = Counter(snap.runs[i].outcome if i in snap.runs else "missing" for i in ids)
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))


def workflow_counts(snap: Snapshot, ids: Iterable[str]) -> str:
    counts = Counter(snap.workflows.get(i, "missing") for i in ids)
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def attempt_counts(snap: Snapshot) -> Counter[str]:
    return Counter(a.outcome for rows in snap.attempts.values() for a in rows)


def run_checks(engine: Engine, expected: Expected, record_dir: Path,
               ended_ns: dict[int, int], end_ns: int, cap: int) -> tuple[list[Check], Snapshot]:
    snap = read_snapshot(engine)
    records = read_pool_records(record_dir, ended_ns, end_ns)
    checks = [
        runs_lost(snap, expected),
        duplicate_deliveries(snap),
        attempts_over_policy(snap, records.starts),
        *stuck(snap),
        *pool_overlap(records, snap, expected, cap),
        step_pool_overlap(snap),
        steps_rerun_after_journaled(snap, expected),
        workflows_failed_by_engine(snap, expected),
        beyond_at_least_once(snap, expected, records.ends),
    ]
    return checks, snap


# -- evidence --------------------------------------------------------------------------------


def describe_workflow(engine: Engine, workflow_id: str) -> str:
    """A workflow's journal, runs and attempts, for the report of a lost one."""
    queries = [
        ("journal", "SELECT name, kind, state, run_id, attempts, started_ms, finished_ms, "
                    "wake_ms FROM tiers_workflow_steps WHERE workflow_id = :wf ORDER BY position"),
        ("runs", "SELECT id, fn, state, outcome, attempts, failures, due_ms, created_ms, "
                 "started_ms, finished_ms FROM tiers_runs WHERE owner = :wf OR id = :wf "
                 "ORDER BY created_ms"),
        ("attempts", "SELECT a.run_id, a.number, a.worker, a.started_ms, a.finished_ms, "
                     "a.outcome FROM tiers_attempts a JOIN tiers_runs r ON r.id = a.run_id "
                     "WHERE r.owner = :wf OR r.id = :wf ORDER BY a.started_ms"),
    ]
    lines = [f"workflow {workflow_id}:"]
    with engine.connect() as conn:
        for title, sql in queries:
            result = conn.execute(text(sql), {"wf": workflow_id})
            lines.append(f"  {title}: {' | '.join(result.keys())}")
            lines += [f"    {' | '.join(str(v) for v in row)}" for row in result]
    return "\n".join(lines)


def lost_workflows(snap: Snapshot, expected: Expected) -> list[str]:
    return [i for i in expected.workflows
            if snap.workflows.get(i) not in FINISHED_WORKFLOW or not snap.delivered(i)]
