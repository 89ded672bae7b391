"""durable-tiers against its peers, on the same workloads, in one invocation.

    pip install -e '.[bench]'
    python -m bench.compare                     # every workload, 3 alternating rounds
    python -m bench.compare --workloads noop --rounds 5 --png /tmp/noop.png

Workloads (each peer where it has the feature):
  noop     2,000 no-op jobs end to end, concurrency 10             (runs/s, higher wins)
  steps    one workflow of 500 sequential no-op steps              (ms/step, lower wins)
  backoff  lateness of a 250 ms retry backoff                      (p95 ms, lower wins)

Each system runs in its own subprocess (bench/ours.py, bench/peers/*). Rounds
alternate the order of systems, so drift of the machine falls on everyone alike; the
table shows medians, and the ratio durable-tiers / peer oriented so that > 1 means
durable-tiers is ahead. Peers on SQLite are compared with durable-tiers on SQLite,
peers on PostgreSQL with durable-tiers on PostgreSQL, the others (Redis, in-memory)
with durable-tiers on SQLite, its embedded default.
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

    @property
    def ours(self) -> bool:
        return self.module == "ours"

    def compared_backend(self) -> str:
        """Which durable-tiers backend this system is measured against."""
        return "postgres" if self.backend == "postgres" else "sqlite"


SYSTEMS = [
    System("durable-tiers (SQLite)", "ours", "sqlite", ("noop", "steps", "backoff")),
    System("durable-tiers (PostgreSQL)", "ours", "postgres", ("noop", "steps", "backoff")),
    System("DBOS (SQLite)", "dbos_peer", "sqlite", ("noop", "steps", "backoff")),
    System("DBOS (PostgreSQL)", "dbos_peer", "postgres", ("noop", "steps", "backoff")),
    System("Huey (SQLite)", "huey_peer", "sqlite", ("noop", "backoff")),
    System("Procrastinate (PostgreSQL)", "procrastinate_peer", "postgres", ("noop", "backoff")),
    System("Celery (Redis)", "celery_peer", "redis", ("noop", "backoff")),
    System("tenacity (not durable)", "tenacity_peer", "memory", ("noop", "backoff")),
]

# workload -> (JSON field, unit, higher is better)
METRICS = {
    "noop": ("runs_per_s", "runs/s", True),
    "steps": ("ms_per_step", "ms/step", False),
    "backoff": ("p95_ms", "p95 ms late", False),
}
DEFAULT_N = {"noop": 2000, "steps": 500, "backoff": 20}


def run_once(system: System, workload: str, n: int, timeout: float) -> dict[str, Any]:
    module = "bench.ours" if system.ours else f"bench.peers.{system.module}"
    cmd = [sys.executable, "-m", module, workload, "--backend", system.backend, "--n", str(n),
           "--timeout", str(timeout)]
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


def measure(workloads: list[str], rounds: int, timeout: float,
            only: set[str] | None) -> dict[tuple[str, str], list[dict[str, Any]]]:
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    plan = [(w, s) for w in workloads for s in SYSTEMS
            if w in s.workloads and (only is None or s.module in only or s.ours)]
    with Progress(console=console) as progress:
        task = progress.add_task("measuring", total=len(plan) * rounds)
        for r in range(rounds):
            order = plan if r % 2 == 0 else list(reversed(plan))
            for workload, system in order:
                progress.update(task, description=f"round {r + 1}: {system.label} {workload}")
                result = run_once(system, workload, DEFAULT_N[workload], timeout)
                results.setdefault((workload, system.label), []).append(result)
                progress.advance(task)
    return results


def median_of(samples: list[dict[str, Any]], field: str) -> float | None:
    values = [s[field] for s in samples if isinstance(s.get(field), int | float)]
    return statistics.median(values) if values else None


def report(results: dict[tuple[str, str], list[dict[str, Any]]], workloads: list[str],
           png: Path | None) -> None:
    out = Console(width=max(Console().width, 130))
    chart: dict[str, list[tuple[str, float]]] = {}
    for workload in workloads:
        field, unit, higher = METRICS[workload]
        ours = {s.backend: median_of(results.get((workload, s.label), []), field)
                for s in SYSTEMS if s.ours}
        table = Table("system", unit, "durable-tiers / peer", "note",
                      title=f"{workload}: n={DEFAULT_N[workload]}, medians of each round")
        for system in SYSTEMS:
            samples = results.get((workload, system.label))
            if not samples:
                continue
            value = median_of(samples, field)
            notes = {str(s.get("note") or s.get("error") or "") for s in samples} - {""}
            if samples and samples[0].get("supported") is False:
                table.add_row(system.label, "n/a", "", "; ".join(sorted(notes)))
                continue
            ratio = ""
            mine = ours.get(system.compared_backend())
            if not system.ours and value and mine:
                r = mine / value if higher else value / mine
                ratio = f"{r:.2f}x {'ahead' if r >= 1 else 'BEHIND'}"
            shown = "error" if value is None else f"{value:,.2f}"
            table.add_row(system.label, shown, ratio, "; ".join(sorted(notes))[:80])
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
                      set(args.peers) if args.peers else None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({f"{w}|{s}": v for (w, s), v in results.items()},
                                        indent=1))
    report(results, args.workloads, args.png)


if __name__ == "__main__":
    main()
