"""durable-tiers against its peers, on the same workloads, at equal durability.

    pip install -e '.[bench]'
    python -m bench.compare                     # every workload, 3 alternating rounds
    python -m bench.compare --workloads noop --rounds 5 --png /tmp/noop.png
    python -m bench.compare --replot results.json   # report saved --json results again

Workloads (each peer where it has the feature):
  noop     2,000 no-op jobs end to end, concurrency 10             (runs/s, higher wins)
  steps    one workflow of 500 sequential no-op steps              (ms/step, lower wins)
  backoff  lateness of a 250 ms retry backoff                      (p95 ms, lower wins)
  workflows  300 workflows of 5 no-op steps started at once        (workflows/s, higher wins)

Same work: durable-tiers' noop job is the sync no-op (`noop_sync`, run on a worker
thread) as the peers' tasks are plain functions (`--fn noop` for the async one). Its
end is seen by counting completed runs every 5 ms, as the peers' harnesses poll.
DBOS's job is a queued workflow with one step (7 row writes per job); the "no step"
rows enqueue a bare workflow (5). A durable-tiers run writes 4. Concurrent workflows:
durable-tiers' harness starts its async workflows one by one with `start_async` from
an event loop; DBOS's starts sync workflows with `DBOS.start_workflow` (its faster
way here) and, in the "async" rows, async ones with `start_workflow_async`.

Durability rows. A commit's durability costs more than anything else here, so each
system runs at a stated setting and ratios pair only rows of equal durability:
  durable-tiers (SQLite, FULL)              Retrier(durability="full"): synchronous FULL
  durable-tiers (SQLite, NORMAL = default)  synchronous NORMAL, the library's default
  durable-tiers (PostgreSQL, sync on)       engine writes with synchronous_commit on
  durable-tiers (PostgreSQL, sync off = default)  ... off (enqueues always wait)
  Huey (SQLite, FULL = default)   fsync=None: SQLite's default, FULL (read back)
  Huey (SQLite, NORMAL)           a SqliteStorage subclass sets synchronous NORMAL
  DBOS, Procrastinate             their defaults: SQLite synchronous FULL (DBOS, rollback
                                  journal) and the server's synchronous_commit (on)
Pairs: Huey FULL and DBOS SQLite with ours SQLite FULL, Huey NORMAL with ours SQLite
NORMAL, every PostgreSQL peer with ours PostgreSQL sync on. Celery (Redis,
task_acks_late=True for at-least-once) and tenacity (in memory) are paired with ours
SQLite FULL; what Celery's queue survives depends on Redis's persistence, which the
table shows as measured (CONFIG GET appendonly / appendfsync / save). The ours rows
at the defaults (SQLite NORMAL, PostgreSQL sync off) stand beside, unpaired with
peers at a stronger setting.

Each system runs in its own subprocess (bench/ours.py, bench/peers/*). Rounds
alternate the order of systems, so drift of the machine falls on everyone alike. The
table shows each median with the min-max of the rounds beside it, how many rounds
gave a number, and the ratio durable-tiers / peer of the medians, oriented so that
> 1 means durable-tiers is ahead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True)


@dataclass(frozen=True)
class System:
    label: str
    module: str  # "ours" or a bench.peers module
    backend: str
    workloads: tuple[str, ...]
    durability: str  # what a commit survives, as configured (results may add what was read back)
    args: tuple[str, ...] = ()  # extra command-line arguments for the module
    versus: str = ""  # peers: the durable-tiers row of equal durability the ratio is taken to

    @property
    def ours(self) -> bool:
        return self.module == "ours"


ALL = ("noop", "steps", "backoff", "workflows")
QUEUES = ("noop", "backoff")
OURS_SQLITE_FULL = "durable-tiers (SQLite, FULL)"
OURS_SQLITE_NORMAL = "durable-tiers (SQLite, NORMAL = default)"
OURS_PG_ON = "durable-tiers (PostgreSQL, sync on)"
OURS_PG_OFF = "durable-tiers (PostgreSQL, sync off = default)"

SYSTEMS = [
    System(OURS_SQLITE_FULL, "ours", "sqlite", ALL, "WAL, synchronous FULL",
           ("--durability", "full")),
    System(OURS_SQLITE_NORMAL, "ours", "sqlite", ALL, "WAL, synchronous NORMAL (default)",
           ("--durability", "normal")),
    System(OURS_PG_ON, "ours", "postgres", ALL, "synchronous_commit on",
           ("--durability", "full")),
    System(OURS_PG_OFF, "ours", "postgres", ALL,
           "engine writes synchronous_commit off (default); enqueues on",
           ("--durability", "normal")),
    System("DBOS (SQLite, FULL = default)", "dbos_peer", "sqlite", ALL,
           "rollback journal, synchronous FULL (SQLite default)", versus=OURS_SQLITE_FULL),
    System("DBOS (SQLite, FULL = default, no step)", "dbos_peer", "sqlite", ("noop",),
           "rollback journal, synchronous FULL (SQLite default)", ("--extra", "nostep"),
           versus=OURS_SQLITE_FULL),
    System("DBOS (SQLite, FULL = default, async)", "dbos_peer", "sqlite", ("workflows",),
           "rollback journal, synchronous FULL (SQLite default)", ("--extra", "async"),
           versus=OURS_SQLITE_FULL),
    System("DBOS (PostgreSQL, sync on = default)", "dbos_peer", "postgres", ALL,
           "synchronous_commit on (server default)", versus=OURS_PG_ON),
    System("DBOS (PostgreSQL, sync on = default, no step)", "dbos_peer", "postgres",
           ("noop",), "synchronous_commit on (server default)", ("--extra", "nostep"),
           versus=OURS_PG_ON),
    System("DBOS (PostgreSQL, sync on = default, async)", "dbos_peer", "postgres",
           ("workflows",), "synchronous_commit on (server default)", ("--extra", "async"),
           versus=OURS_PG_ON),
    System("Huey (SQLite, FULL = default)", "huey_peer", "sqlite", QUEUES,
           "WAL, synchronous FULL (huey default: fsync=None)", versus=OURS_SQLITE_FULL),
    System("Huey (SQLite, NORMAL)", "huey_peer", "sqlite", QUEUES, "WAL, synchronous NORMAL",
           ("--durability", "normal"), versus=OURS_SQLITE_NORMAL),
    System("Procrastinate (PostgreSQL, sync on = default)", "procrastinate_peer", "postgres",
           QUEUES, "synchronous_commit on (server default)", versus=OURS_PG_ON),
    System("Celery (Redis, acks_late)", "celery_peer", "redis", QUEUES,
           "Redis persistence", versus=OURS_SQLITE_FULL),
    System("tenacity (not durable)", "tenacity_peer", "memory", QUEUES, "none (in memory)",
           versus=OURS_SQLITE_FULL),
]

DASH = "\u2013"  # en dash, between the min and the max of the rounds

# workload -> (JSON field, unit, higher is better)
METRICS = {
    "noop": ("runs_per_s", "runs/s", True),
    "steps": ("ms_per_step", "ms/step", False),
    "backoff": ("p95_ms", "p95 ms late", False),
    "workflows": ("workflows_per_s", "workflows/s", True),
}
DEFAULT_N = {"noop": 2000, "steps": 500, "backoff": 20, "workflows": 300}


def run_once(system: System, workload: str, n: int, timeout: float,
             fn: str = "noop_sync") -> dict[str, Any]:
    module = "bench.ours" if system.ours else f"bench.peers.{system.module}"
    cmd = [sys.executable, "-m", module, workload, "--backend", system.backend, "--n", str(n),
           "--timeout", str(timeout), *system.args]
    if system.ours and workload == "noop":
        cmd += ["--fn", fn]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout + 60, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout + 60:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("{")]
    if not lines:
        return {"error": f"no output (exit {done.returncode}): {done.stderr[-300:]}"}
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def measure(workloads: list[str], rounds: int, timeout: float, only: set[str] | None,
            fn: str = "noop_sync") -> dict[tuple[str, str], list[dict[str, Any]]]:
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    plan = [(w, s) for w in workloads for s in SYSTEMS
            if w in s.workloads and (only is None or s.module in only or s.ours)]
    with Progress(console=console) as progress:
        task = progress.add_task("measuring", total=len(plan) * rounds)
        for r in range(rounds):
            order = plan if r % 2 == 0 else list(reversed(plan))
            for workload, system in order:
                progress.update(task, description=f"round {r + 1}: {system.label} {workload}")
                result = run_once(system, workload, DEFAULT_N[workload], timeout, fn)
                results.setdefault((workload, system.label), []).append(result)
                progress.advance(task)
    return results


def values_of(samples: list[dict[str, Any]], field: str) -> list[float]:
    return [float(s[field]) for s in samples if isinstance(s.get(field), int | float)]


def median_of(samples: list[dict[str, Any]], field: str) -> float | None:
    values = values_of(samples, field)
    return statistics.median(values) if values else None


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def shown(values: list[float]) -> str:
    """The median, with the range of the rounds beside it: `1,234 (1,100-1,300)`
    (with an en dash)."""
    if not values:
        return "error"
    middle = number(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({number(min(values))}{DASH}{number(max(values))})"


def durability_of(system: System, samples: list[dict[str, Any]]) -> str:
    """The durability as configured, or as the run read it back where it did."""
    if system.module == "huey_peer":  # reports the pragma its connections have
        seen = {f"synchronous={s['synchronous']}" for s in samples if s.get("synchronous")}
        return "; ".join([system.durability, *(f"{x} (read back)" for x in sorted(seen))])
    if system.ours:
        return system.durability
    seen = {str(s["durability"]) for s in samples if s.get("durability")}
    if system.module == "celery_peer" and seen:
        return f"Redis persistence: {'; '.join(sorted(seen))}"
    return "; ".join(sorted(seen)) if seen else system.durability


def report(results: dict[tuple[str, str], list[dict[str, Any]]], workloads: list[str],
           png: Path | None) -> None:
    out = Console(width=max(Console().width, 200))
    chart: dict[str, list[tuple[str, float]]] = {}
    known = {s.label for s in SYSTEMS}
    # Rows saved under labels this version no longer has (--replot of older JSON).
    systems = SYSTEMS + [System(label, "ours" if label.startswith("durable-tiers") else "?",
                                "?", ALL, "?")
                         for label in sorted({label for _, label in results} - known)]
    for workload in workloads:
        field, unit, higher = METRICS[workload]
        rounds = max((len(v) for (w, _), v in results.items() if w == workload), default=0)
        table = Table("system", "durability", f"{unit}: median (min{DASH}max)", "ok rounds",
                      "durable-tiers / peer, equal durability", "note",
                      title=f"{workload}: n={DEFAULT_N[workload]}, {rounds} rounds, "
                            f"{'higher' if higher else 'lower'} is better")
        for system in systems:
            samples = results.get((workload, system.label))
            if not samples:
                continue
            values = values_of(samples, field)
            notes = {str(s.get("note") or s.get("error") or "") for s in samples} - {""}
            if samples[0].get("supported") is False:
                table.add_row(system.label, "", "n/a", "", "", "; ".join(sorted(notes)))
                continue
            ratio = ""
            value = median_of(samples, field)
            mine = median_of(results.get((workload, system.versus), []), field)
            if not system.ours and value and mine:
                r = mine / value if higher else value / mine
                versus = system.versus.removeprefix("durable-tiers (").removesuffix(")")
                ratio = f"{r:.2f}x {'ahead' if r >= 1 else 'BEHIND'} (ours {versus})"
            table.add_row(system.label, durability_of(system, samples), shown(values),
                          f"{len(values)}/{len(samples)}", ratio,
                          "; ".join(sorted(notes))[:90])
            if value is not None:
                chart.setdefault(workload, []).append((system.label, value))
        out.print(table)
    if png is not None:
        draw(chart, png)
        out.print(f"chart written to {png}")


def draw(chart: dict[str, list[tuple[str, float]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(chart), figsize=(6 * len(chart), 5), squeeze=False)
    for ax, (workload, rows) in zip(axes[0], chart.items(), strict=True):
        _, unit, higher = METRICS[workload]
        labels = [label.replace(" (", "\n(") for label, _ in rows]
        colors = ["tab:green" if label.startswith("durable-tiers") else "tab:gray"
                  for label, _ in rows]
        ax.barh(labels, [v for _, v in rows], color=colors)
        ax.set_title(f"{workload} ({unit}, {'higher' if higher else 'lower'} is better)")
        ax.invert_yaxis()
        if workload in ("noop", "backoff"):  # values span orders of magnitude
            ax.set_xscale("log")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(METRICS), default=list(METRICS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--peers", nargs="+", help="only these peer modules (e.g. huey_peer)")
    parser.add_argument("--fn", choices=["noop_sync", "noop"], default="noop_sync",
                        help="durable-tiers' action in the noop workload (default: sync, "
                             "like the peers' tasks)")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "compare.png")
    parser.add_argument("--json", type=Path, help="also write every raw result here")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: report and draw results saved with --json")
    args = parser.parse_args(argv)
    if args.replot:
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for path in args.replot:
            for key, samples in json.loads(path.read_text()).items():
                workload, label = key.split("|", 1)
                results[(workload, label)] = samples
        report(results, [w for w in args.workloads if any(k[0] == w for k in results)],
               args.png)
        return
    results = measure(args.workloads, args.rounds, args.timeout,
                      set(args.peers) if args.peers else None, args.fn)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({f"{w}|{s}": v for (w, s), v in results.items()},
                                        indent=1))
    report(results, args.workloads, args.png)


if __name__ == "__main__":
    main()
