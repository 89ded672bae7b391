"""What metrics and tracing cost in `bench.throughput`: off and on, in alternating rounds.

    python -m bench.observe_overhead                      # SQLite, in-process worker
    python -m bench.observe_overhead --rounds 6 --n 5000 --samples 0.1 1
    python -m bench.observe_overhead --before ../other-checkout   # that code as well

Each round runs `python -m bench.throughput --workers 0` once per setting (off, then
`--observe --sample S` for each S), each in a fresh process, so a busy spell of the
machine touches every setting alike; the settings' order turns by one each round.
Prints, per setting, the median and range of runs/s and of the process's CPU per
run, and the medians' change from off. `--before DIR` runs the same settings with
the code of another checkout too (its own bench.throughput), in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RATE = re.compile(r"in-process: ([\d,]+) runs/s")
_CPU = re.compile(r"cpu of this process: ([\d,]+) us/run")


def one(db: str, n: int, sample: float | None, tree: Path = ROOT) -> tuple[float, float]:
    """(runs/s, CPU µs per run) of one `bench.throughput` process, run with the code
    of `tree`."""
    cmd = [sys.executable, "-m", "bench.throughput", "--db", db, "--workers", "0",
           "--n", str(n), "--samples", "2"]
    if sample is not None:
        cmd += ["--observe", "--sample", str(sample)]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    rate, cpu = _RATE.search(text), _CPU.search(text)
    if rate is None or cpu is None:
        raise RuntimeError(f"no figures in the output of {' '.join(cmd)}:\n{text}")
    return float(rate[1].replace(",", "")), float(cpu[1].replace(",", ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=float, nargs="+", default=[1.0, 0.1],
                        help="the sampling ratios to measure with --observe")
    parser.add_argument("--before", type=Path,
                        help="another checkout whose code to measure as well")
    args = parser.parse_args(argv)
    Setting = tuple[float | None, Path]
    settings: list[Setting] = [(None, ROOT)] + [(s, ROOT) for s in args.samples]
    if args.before is not None:
        settings += [(s, args.before.resolve()) for s in args.samples]

    def name(setting: Setting) -> str:
        s, tree = setting
        label = "off" if s is None else f"on, sample {s:g}"
        return label if tree == ROOT else f"{label}, before"

    rates: dict[Setting, list[float]] = {s: [] for s in settings}
    cpus: dict[Setting, list[float]] = {s: [] for s in settings}
    for r in range(args.rounds):
        k = r % len(settings)
        for setting in settings[k:] + settings[:k]:
            rate, cpu = one(args.db, args.n, setting[0], setting[1])
            rates[setting].append(rate)
            cpus[setting].append(cpu)
            print(f"round {r + 1} {name(setting):24s} {rate:7,.0f} runs/s {cpu:6,.0f} µs/run",
                  flush=True)
    off_rate, off_cpu = statistics.median(rates[settings[0]]), statistics.median(cpus[settings[0]])
    print(f"\n{args.db}, in-process worker, {args.n} no-op runs, {args.rounds} rounds: "
          "median (range)")
    for setting in settings:
        rate, cpu = statistics.median(rates[setting]), statistics.median(cpus[setting])
        r_, c_ = rates[setting], cpus[setting]
        change = "" if setting[0] is None else (
            f"   runs/s {rate / off_rate - 1:+.0%}, CPU {cpu / off_cpu - 1:+.0%}"
        )
        print(f"{name(setting):24s} {rate:7,.0f} ({min(r_):,.0f}-{max(r_):,.0f}) runs/s"
              f"   {cpu:5,.0f} ({min(c_):,.0f}-{max(c_):,.0f}) µs/run{change}")


if __name__ == "__main__":
    main()
