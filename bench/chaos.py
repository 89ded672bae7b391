"""Chaos: worker processes SIGKILLed in a storm while they run every tier; then checks.

    python -m bench.chaos                        # PostgreSQL (100 kills), then SQLite (50)
    python -m bench.chaos --backend postgresql --kills 100
    python -m bench.chaos --backend sqlite --kills 50 --runs 1000
    python -m bench.chaos --backend postgresql --terminate-backends   # the shared server

What runs: N `tiers worker bench.chaos_app:retrier` processes (3 by default) share one
database, a SQLite file or PostgreSQL. While a feeder enqueues retrier runs, items
of a pool capped at 3 and four-step workflows (see bench/chaos_app.py), a killer
SIGKILLs a worker every --kill-every seconds (one holding leases when there is one)
and starts a replacement, until --kills kills. 30% of attempts fail (deterministically,
from a hash). Every on_complete is a session handler that inserts into a table with
UNIQUE(run_id). On PostgreSQL the server is also disrupted --disruptions times
mid-storm: restarted, when the harness can make a throwaway cluster of its own
(root and pg_createcluster; never the shared server), otherwise the workers'
backends are terminated with pg_terminate_backend. Then everything is left to
finish (--drain-timeout), the workers are stopped with SIGTERM, and it checks:

- runs lost: every run, item and workflow completed, and its on_complete committed;
- duplicate exactly-once effects: at most one on_complete commit per run;
- attempts over the policy: no run attempted more often than max_failures allows
  (lost attempts count), from the engine's attempts and from the actions' effects;
- stuck leases / unfinished runs: nothing running, delivering, pending or finishing;
- the pool's maximum overlap, of the actions themselves (a killed attempt ends when
  its process died) and of the slots (a lost attempt holds its slot until its lease
  is reaped): both at most the cap;
- the steps' pool's maximum overlap (cap 10), from the engine's attempt stamps: a
  step that starts by completing the step before it takes over that slot unlocked
  (`tiers_step_v2`), and the cap must still hold;
- steps re-run after being journaled: no step's action began after its result was
  journaled (a step whose worker died mid-action may run again: it began before);
- workflows failed by an engine error: a workflow fails only because a step
  exhausted its attempts (StepFailed), never over a database error;
- executions beyond at-least-once: an action succeeds once per run, plus once per
  lost attempt of that run.

It prints a table of these numbers, with facts (kills, lost attempts, outcomes, the
workers' tracebacks and logged errors) and exits non-zero if a check failed. Workers'
logs are kept (and their directory printed) when a check fails, or with --keep.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from bench.chaos_app import ChaosApp, build
from bench.chaos_checks import (
    Check,
    Expected,
    Snapshot,
    attempt_counts,
    describe_workflow,
    lost_workflows,
    outcome_counts,
    run_checks,
    worker_pid,
    workflow_counts,
)
from bench.chaos_db import (
    Database,
    can_make_cluster,
    deadlocks,
    postgres_cluster,
    postgres_schema,
    sqlite_database,
)
from bench.chaos_fleet import Fleet, environment, log_messages, tracebacks

T = TypeVar("T")
Say = Callable[[str], None]
STALL_S = 5.0


@dataclass(frozen=True)
class Settings:
    """One chaos run's knobs; the command line sets them (tests/test_chaos.py too)."""

    runs: int = 2000
    items: int = 300
    workflows: int = 200
    workers: int = 3
    concurrency: int = 8
    kills: int = 100
    kill_every: float = 0.25  # seconds between kills (at least: see min_up)
    min_up: float = 0.5  # a worker that has served less than this is not killed
    cap: int = 3
    fail_pct: int = 30
    lease: float = 2.0
    run_ms: int = 20
    item_ms: int = 40
    nap_ms: int = 200  # the workflows' durable sleep
    disruptions: int = 2  # PostgreSQL only
    drain_timeout: float = 240.0
    seed: int = 1


@dataclass
class Report:
    """The checks of one chaos run, and facts that help read them."""

    label: str
    settings: Settings
    checks: list[Check]
    facts: list[tuple[str, str]] = field(default_factory=list)
    kills: int = 0
    lost_attempts: int = 0  # attempts the engine recorded as lost (their worker died)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def render(self) -> str:
        width = max(len(c.name) for c in self.checks) + 2
        lines = [f"\n== {self.label}", f"{'check':<{width}}{'value':>14}  {'limit':<7}result"]
        for c in self.checks:
            lines.append(f"{c.name:<{width}}{c.value:>14}  {c.limit:<7}"
                         f"{'ok' if c.ok else 'FAILED'}")
            lines += [f"    e.g. {e}" for e in c.evidence if not c.ok]
        lines.append("")
        lines += [f"{name}: {value}" for name, value in self.facts]
        lines.append(f"RESULT: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


# -- enqueueing, durably ----------------------------------------------------------------


class Feeder:
    """Enqueues the work a little at a time, so there is work in flight at every kill."""

    def __init__(self, app: ChaosApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.expected = Expected()

    def feed(self, fraction: float) -> None:
        """Enqueue until `fraction` of each kind of work has been enqueued."""
        s, e = self.settings, self.expected
        self._runs(range(len(e.runs), round(s.runs * fraction)))
        self._items(range(len(e.items), round(s.items * fraction)))
        self._workflows(range(len(e.workflows), round(s.workflows * fraction)))

    def _runs(self, ns: range) -> None:
        if not ns:
            return
        retrier = self.app.retrier

        def write(session: Session) -> dict[str, int]:
            return {
                retrier.run("chaos_flaky", {"n": n, "ms": self.settings.run_ms},
                            on_complete="chaos_record", context={"kind": "run"},
                            session=session): n
                for n in ns
            }

        self.expected.runs.update(self._durably(write))

    def _items(self, items: range) -> None:
        if not items:
            return
        options = {"on_complete": "chaos_record", "context": {"kind": "item"}}

        def write(session: Session) -> dict[str, int]:
            batch: list[Any] = [("chaos_interval", {"item": i, "ms": self.settings.item_ms},
                                 options) for i in items]
            ids = self.app.pool.enqueue_batch(batch, session=session)
            return dict(zip(ids, items, strict=True))

        self.expected.items.update(self._durably(write))

    def _workflows(self, numbers: range) -> None:
        # Keys make a second attempt return the ids of a first whose commit went
        # through unanswered.
        if not numbers:
            return

        def write(session: Session) -> dict[str, str]:
            return {
                self.app.workflows.start("chaos_flow", {"label": f"w{i}"},
                                         on_complete="chaos_record",
                                         context={"kind": "workflow"},
                                         idempotency_key=f"w{i}", session=session): f"w{i}"
                for i in numbers
            }

        self.expected.workflows.update(self._durably(write))

    def _durably(self, write: Callable[[Session], dict[str, T]]) -> dict[str, T]:
        """Run `write` in one transaction, again if the database was away; a commit
        whose answer was lost is detected by looking for the ids it wrote."""
        written: dict[str, T] = {}
        for _ in range(60):
            try:
                with self.app.retrier.session() as session:
                    written = write(session)
                    session.commit()
                return written
            except DBAPIError:
                if written and _all_exist(self.app, list(written)):
                    return written
                self.app.retrier.engine.dispose()
                time.sleep(0.5)
        raise RuntimeError("could not enqueue for 30 s: is the database down?")


def _all_exist(app: ChaosApp, ids: list[str]) -> bool:
    query = text("SELECT count(*) FROM tiers_runs WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True))
    found = _retrying(app, lambda conn: int(conn.execute(query, {"ids": ids}).scalar() or 0))
    return found == len(ids)


def _retrying(app: ChaosApp, read: Callable[[Any], T], attempts: int = 60) -> T:
    """A read on the harness's own connection, again if the database was away."""
    for _ in range(attempts - 1):
        try:
            with app.retrier.engine.connect() as conn:
                return read(conn)
        except DBAPIError:
            app.retrier.engine.dispose()
            time.sleep(0.5)
    with app.retrier.engine.connect() as conn:
        return read(conn)


# -- the storm ---------------------------------------------------------------------------


def _progress(app: ChaosApp) -> tuple[int, int, int]:
    """(completed runs, unfinished runs, lost attempts so far)."""
    def read(conn: Any) -> tuple[int, int, int]:
        done, left = conn.execute(text(
            "SELECT sum(CASE WHEN state = 'completed' THEN 1 ELSE 0 END), "
            "sum(CASE WHEN state <> 'completed' THEN 1 ELSE 0 END) FROM tiers_runs")).one()
        lost = conn.execute(text(
            "SELECT count(*) FROM tiers_attempts WHERE outcome = 'lost'")).scalar()
        return int(done or 0), int(left or 0), int(lost or 0)

    return _retrying(app, read)


def _lease_holders(app: ChaosApp) -> set[int]:
    """Pids of the workers that hold a running run now."""
    rows = _retrying(app, lambda conn: conn.execute(text(
        "SELECT DISTINCT lease_owner FROM tiers_runs WHERE state = 'running'")).all())
    return {pid for (owner,) in rows if (pid := worker_pid(owner)) is not None}


@dataclass
class Storm:
    """The killer loop (with the feeder and the disruptions), then the drain."""

    app: ChaosApp
    db: Database
    fleet: Fleet
    feeder: Feeder
    settings: Settings
    say: Say
    began: float = field(default_factory=time.monotonic)
    hits: int = 0  # kills of a worker that held a running run
    disruptions: list[str] = field(default_factory=list)

    def run(self) -> None:
        s = self.settings
        disrupt_at = {round(s.kills * (i + 1) / (s.disruptions + 1))
                      for i in range(s.disruptions)} if self.db.disruption else set()
        every = max(1, s.kills // 10)
        self.feeder.feed(1 / max(s.kills, 1))
        for k in range(1, s.kills + 1):
            time.sleep(s.kill_every)
            holders = _lease_holders(self.app)
            pid = self.fleet.kill_random(s.min_up, holders)
            self.hits += pid in holders
            self.fleet.fill()
            if k in disrupt_at:
                self._disrupt()
            self.feeder.feed(min(1.0, (k + 1) / s.kills))
            if k % every == 0 or k == s.kills:
                self.say(self._line(f"kills {k}/{s.kills} ({self.hits} held running runs)"))
        self.feeder.feed(1.0)

    def _disrupt(self) -> None:
        what = self.db.disrupt()
        self.app.retrier.engine.dispose()  # the harness's own connections died too
        self.disruptions.append(what)
        self.say(self._line(f"disruption {len(self.disruptions)}: {what}"))

    def _line(self, head: str) -> str:
        done, left, lost = _progress(self.app)
        e = self.feeder.expected
        return (f"  {time.monotonic() - self.began:6.1f} s  {head}; enqueued "
                f"{len(e.runs)} runs, {len(e.items)} items, {len(e.workflows)} workflows; "
                f"{done} runs completed, {left} unfinished; {lost} lost attempts")

    def drain(self, timeout: float) -> str:
        """Wait until every run and workflow is over: "yes", "stalled" or "timed out".

        Stalled: workflows still running while no run at all is left to move them
        (a step's outcome and its workflow's next driver are stored together, so
        that state is not transient), for STALL_S in a row.
        """
        deadline = time.monotonic() + timeout
        last_say = time.monotonic()
        idle_since: float | None = None
        while True:
            runs, flows = self._unfinished()
            if runs == 0 and flows == 0:
                self.say(self._line("drained"))
                return "yes"
            idle_since = (idle_since or time.monotonic()) if runs == 0 else None
            if idle_since is not None and time.monotonic() - idle_since > STALL_S:
                self.say(self._line(f"STALLED: {flows} workflows running, no run left"))
                return "stalled"
            if time.monotonic() > deadline:
                self.say(self._line(f"DRAIN TIMED OUT after {timeout:.0f} s"))
                return "timed out"
            if time.monotonic() - last_say > 10:
                last_say = time.monotonic()
                self.say(self._line("draining"))
            self.fleet.replace_exited()
            time.sleep(0.1)

    def _unfinished(self) -> tuple[int, int]:
        """(runs not completed, workflows running)."""
        def read(conn: Any) -> tuple[int, int]:
            runs = conn.execute(text(
                "SELECT count(*) FROM tiers_runs WHERE state <> 'completed'")).scalar()
            flows = conn.execute(text(
                "SELECT count(*) FROM tiers_workflows WHERE state = 'running'")).scalar()
            return int(runs or 0), int(flows or 0)

        return _retrying(self.app, read)


# -- one chaos run ------------------------------------------------------------------------


def run_chaos(settings: Settings, db: Database, workdir: Path, say: Say = print) -> Report:
    """One chaos run on `db`; the workers' logs and the pool's records go to `workdir`."""
    record_dir, log_dir = workdir / "records", workdir / "logs"
    record_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    app = build(db.url, record_dir, cap=settings.cap, fail_pct=settings.fail_pct,
                lease_s=settings.lease, nap_ms=settings.nap_ms)
    fleet = Fleet(settings.workers,
                  environment(record_dir, settings.cap, settings.fail_pct, settings.lease,
                              settings.nap_ms),
                  db.worker_url, log_dir, settings.concurrency, settings.lease,
                  random.Random(settings.seed))
    storm = Storm(app, db, fleet, Feeder(app, settings), settings, say)
    say(f"{db.label}: {settings.workers} workers x concurrency {settings.concurrency}, "
        f"lease {settings.lease:g} s; {settings.kills} SIGKILLs; {settings.runs} runs, "
        f"{settings.items} items (cap {settings.cap}), {settings.workflows} workflows; "
        f"{settings.fail_pct}% of attempts fail")
    try:
        fleet.fill()
        storm.run()
        storm_s = time.monotonic() - storm.began
        drained = storm.drain(settings.drain_timeout)
    finally:
        fleet.stop()
    end_ns = time.time_ns()
    total_s = time.monotonic() - storm.began
    checks, snap = run_checks(app.retrier.engine, storm.feeder.expected, record_dir,
                              fleet.ended_ns, end_ns, settings.cap)
    facts = _facts(storm, snap, log_dir, drained, storm_s, total_s)
    facts += _server_facts(db, log_dir)
    facts += _failure_facts(app)
    facts += [("lost workflow", describe_workflow(app.retrier.engine, wf_id))
              for wf_id in lost_workflows(snap, storm.feeder.expected)[:3]]
    app.retrier.close()
    return Report(db.label, settings, checks, facts, kills=len(fleet.killed),
                  lost_attempts=attempt_counts(snap)["lost"])


def _facts(storm: Storm, snap: Snapshot, log_dir: Path, drained: str,
           storm_s: float, total_s: float) -> list[tuple[str, str]]:
    e, fleet = storm.feeder.expected, storm.fleet
    attempts = attempt_counts(snap)
    crashes = tracebacks(log_dir)
    messages = log_messages(log_dir)
    return [
        ("kills", f"{len(fleet.killed)} SIGKILLs, {storm.hits} of a worker holding a "
                  f"running run; {fleet.started_count} worker processes in all"),
        ("disruptions", "; ".join(storm.disruptions) or "none"),
        ("engine attempts", ", ".join(f"{n} {k}" for k, n in sorted(attempts.items()))),
        ("retrier runs", outcome_counts(snap, e.runs)),
        ("pool items", outcome_counts(snap, e.items)),
        ("workflows", workflow_counts(snap, e.workflows)),
        ("drained", f"{drained}; storm {storm_s:.1f} s, "
                    f"total {total_s:.1f} s"),
        ("worker exits not caused by the harness",
         ", ".join(fleet.unexpected_exits) or "none"),
        ("tracebacks in worker logs",
         ", ".join(f"{n} {k}" for k, n in crashes.most_common()) or "none"),
        ("warnings and errors logged by workers",
         "".join(f"\n    {n:5d}  {m}" for m, n in messages.most_common(12)) or "none"),
    ]


def _server_facts(db: Database, log_dir: Path) -> list[tuple[str, str]]:
    """Deadlocks in the server's log (own cluster only; the log is kept with the workers')."""
    log = db.server_log()
    if log is None:
        return []
    (log_dir / "server.log").write_text(log)
    found = deadlocks(log)
    shown = "".join(f"\n    {d}" for d in found[:6])
    return [("deadlocks in the server log", f"{len(found)}{shown}")]


def _failure_facts(app: ChaosApp) -> list[tuple[str, str]]:
    """Why runs and workflows that failed for good failed, counted by error."""
    def read(conn: Any) -> list[Any]:
        return list(conn.execute(text(
            "SELECT 'run ' || fn, error FROM tiers_runs WHERE outcome = 'failed' "
            "UNION ALL SELECT 'workflow ' || name, error FROM tiers_workflows "
            "WHERE state = 'failed'")).all())

    counts = Counter(f"{what}: {_IDS.sub('_', (error or '')[:100])}"
                     for what, error in _retrying(app, read))
    return [("failed for good", "".join(f"\n    {n:5d}  {e}" for e, n in counts.most_common(8))
             or "nothing")]


_IDS = re.compile(r"[0-9a-f]{32}")


# -- command line --------------------------------------------------------------------------


def _workdir(keep: Path | None) -> Path:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="chaos-", dir=keep))


def open_database(backend: str, disruption: str, pg_port: int,
                  directory: Path) -> AbstractContextManager[Database]:
    if backend == "sqlite":
        return sqlite_database(directory)
    if disruption == "restart":
        return postgres_cluster(pg_port)
    return postgres_schema(terminate=disruption == "terminate")


def _disruption(args: argparse.Namespace) -> str:
    if args.disruption != "auto":
        return str(args.disruption)
    return "restart" if can_make_cluster() else "terminate"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.chaos",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--kills", type=int, help="SIGKILLs (default: 100 on PostgreSQL, 50 on SQLite)")
    p.add_argument("--runs", type=int, default=Settings.runs)
    p.add_argument("--items", type=int, default=Settings.items)
    p.add_argument("--workflows", type=int, default=Settings.workflows)
    p.add_argument("--workers", type=int, default=Settings.workers)
    p.add_argument("--concurrency", type=int, default=Settings.concurrency)
    p.add_argument("--kill-every", type=float, default=Settings.kill_every,
                   help="seconds between kills")
    p.add_argument("--duration", type=float,
                   help="the storm's length in seconds (sets --kill-every to duration/kills)")
    p.add_argument("--cap", type=int, default=Settings.cap)
    p.add_argument("--fail-pct", type=int, default=Settings.fail_pct)
    p.add_argument("--lease", type=float, default=Settings.lease)
    p.add_argument("--disruptions", type=int, default=Settings.disruptions)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--pg-restart", dest="disruption", action="store_const",
                       const="restart", help="restart a PostgreSQL cluster of the harness's own")
    group.add_argument("--terminate-backends", dest="disruption", action="store_const",
                       const="terminate",
                       help="pg_terminate_backend the workers' connections (shared server)")
    group.add_argument("--no-disruption", dest="disruption", action="store_const", const="none")
    p.set_defaults(disruption="auto")
    p.add_argument("--pg-port", type=int, default=55433, help="port of the own cluster")
    p.add_argument("--drain-timeout", type=float, default=Settings.drain_timeout)
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--keep", type=Path, help="keep logs and records under this directory")
    return p


def _settings(args: argparse.Namespace, backend: str) -> Settings:
    kills = args.kills if args.kills is not None else (100 if backend == "postgresql" else 50)
    kill_every = args.duration / max(kills, 1) if args.duration else args.kill_every
    return replace(
        Settings(), runs=args.runs, items=args.items, workflows=args.workflows,
        workers=args.workers, concurrency=args.concurrency, kills=kills, kill_every=kill_every,
        cap=args.cap, fail_pct=args.fail_pct, lease=args.lease,
        disruptions=args.disruptions if backend == "postgresql" else 0,
        drain_timeout=args.drain_timeout, seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    backends = ["postgresql", "sqlite"] if args.backend == "both" else [args.backend]
    disruption = _disruption(args)
    if disruption == "restart" and not can_make_cluster():
        print("--pg-restart needs root and pg_createcluster", file=sys.stderr)
        return 2
    reports = []
    for backend in backends:
        workdir = _workdir(args.keep)
        with open_database(backend, disruption, args.pg_port, workdir) as db:
            report = run_chaos(_settings(args, backend), db, workdir,
                               say=lambda line: print(line, flush=True))
        print(report.render(), flush=True)
        if report.ok and args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs and records kept in {workdir}", flush=True)
        reports.append(report)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
