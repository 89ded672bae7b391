"""The worker processes of `bench.chaos`: start them, SIGKILL them, replace them.

Each worker is `python -m retrier worker bench.chaos_app:retrier` (the `tiers worker`
command) with its stdout and stderr in a log file of its own, so crashes can be
found afterwards (`tracebacks`).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
APP = "bench.chaos_app:retrier"
READY_LINE = "started (concurrency"  # the worker's INFO line once it serves


@dataclass
class Worker:
    number: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path
    ready_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def up_for(self) -> float:
        """Seconds since the worker logged that it started serving (0 before)."""
        if self.ready_at is None:
            if READY_LINE not in self.log_path.read_text(errors="replace"):
                return 0.0
            self.ready_at = time.monotonic()
        return time.monotonic() - self.ready_at


@dataclass
class Fleet:
    """`size` workers kept alive; every process that ever ran is remembered."""

    size: int
    env: dict[str, str]
    url_for: Callable[[int], str]  # worker number -> its database URL
    log_dir: Path
    concurrency: int
    lease_s: float
    rng: random.Random
    alive: list[Worker] = field(default_factory=list)
    ended_ns: dict[int, int] = field(default_factory=dict)  # pid -> when it was seen dead
    killed: set[int] = field(default_factory=set)
    unexpected_exits: list[str] = field(default_factory=list)  # "pid P code C (log)"
    started_count: int = 0

    def fill(self) -> None:
        """Start workers until `size` are running."""
        while len(self.alive) < self.size:
            self.alive.append(self._spawn())

    def _spawn(self) -> Worker:
        self.started_count += 1
        path = self.log_dir / f"worker-{self.started_count:03d}.log"
        log = path.open("wb")
        command = [sys.executable, "-m", "retrier", "worker", APP,
                   "--concurrency", str(self.concurrency), "--lease", str(self.lease_s)]
        env = {**self.env, "CHAOS_DB_URL": self.url_for(self.started_count)}
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        return Worker(self.started_count, proc, log, path)

    def kill_random(self, min_up: float, holders: set[int], timeout: float = 60.0) -> int:
        """SIGKILL a random worker that has served at least `min_up` seconds (so it
        had time to claim work), one of `holders` (pids holding running runs) if any
        is; returns its pid."""
        deadline = time.monotonic() + timeout
        while True:
            self.replace_exited()
            ready = [w for w in self.alive if w.up_for() >= min_up]
            if ready:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker served {min_up} s within {timeout} s")
            time.sleep(0.02)
        victim = self.rng.choice([w for w in ready if w.pid in holders] or ready)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=30)
        self._forget(victim)
        self.killed.add(victim.pid)
        return victim.pid

    def replace_exited(self) -> None:
        """Replace workers that exited by themselves (a crash: remembered)."""
        for w in list(self.alive):
            code = w.proc.poll()
            if code is not None:
                self._forget(w)
                self._exited(w, code)
        self.fill()

    def _forget(self, w: Worker) -> None:
        self.ended_ns[w.pid] = time.time_ns()
        self.alive.remove(w)
        w.log.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker (a graceful stop) and wait; SIGKILL stragglers."""
        for w in self.alive:
            w.proc.send_signal(signal.SIGTERM)
        for w in list(self.alive):
            try:
                code: int | None = w.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                code = w.proc.wait()
            if code != 0:
                self._exited(w, code)
            self._forget(w)

    def _exited(self, w: Worker, code: int | None) -> None:
        self.unexpected_exits.append(f"pid {w.pid} code {code} ({w.log_path.name})")


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Warning|Violation)|"
                             r"KeyboardInterrupt|SystemExit)\b.*")


def tracebacks(log_dir: Path) -> Counter[str]:
    """Tracebacks in the workers' logs, counted by their final exception line's type."""
    found: Counter[str] = Counter()
    for path in sorted(log_dir.glob("worker-*.log")):
        in_traceback = False
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Traceback (most recent call last)"):
                in_traceback = True
            elif in_traceback and not line.startswith((" ", "\t")) and line.strip():
                match = _EXCEPTION_LINE.match(line)
                if match or ":" in line:
                    found[match.group(1) if match else line.split(":")[0][:60]] += 1
                    in_traceback = False
    return found


def log_lines(log_dir: Path, needle: str) -> int:
    """How many lines of the workers' logs contain `needle`."""
    return sum(
        path.read_text(errors="replace").count(needle)
        for path in log_dir.glob("worker-*.log")
    )


def environment(record_dir: Path, cap: int, fail_pct: int, lease_s: float,
                nap_ms: int) -> dict[str, str]:
    """What every worker's environment adds (see bench/chaos_app.py)."""
    return {
        **os.environ,
        "CHAOS_RECORD_DIR": str(record_dir),
        "CHAOS_CAP": str(cap),
        "CHAOS_FAIL_PCT": str(fail_pct),
        "CHAOS_LEASE_S": str(lease_s),
        "CHAOS_NAP_MS": str(nap_ms),
        "TIERS_LOG_LEVEL": "INFO",  # for READY_LINE; the engine logs little at INFO
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }


_LOG_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+): (.*)$")
_IDS = re.compile(r"[0-9a-f]{16,}|\b\d+(\.\d+)?\b|\[[^\]]*\]|\S+:\d+:[0-9a-f]{6}")


def log_messages(log_dir: Path) -> Counter[str]:
    """Warnings and errors the workers logged, with ids and numbers blanked out."""
    found: Counter[str] = Counter()
    for path in sorted(log_dir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match:
                level, logger, message = match.groups()
                found[f"{level} {logger}: {_IDS.sub('_', message)[:90]}"] += 1
    return found
