"""Shared helpers for the peer benchmarks: CLI, timing, stats, cleanup, JSON output.

Every peer module calls :func:`run_main`, which

* keeps file descriptor 1 clean for the single JSON result line (library logs and
  worker subprocesses write to stderr instead),
* installs a hard timeout (a ``BenchTimeout`` raised in the main thread so that
  ``finally`` blocks run, then a last-resort watchdog that kills registered worker
  subprocesses and exits),
* turns any exception into ``{"error": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

WORKLOADS = ("noop", "steps", "backoff", "workflows")
WORKER_MODE = "_worker"
DEFAULT_N = {"noop": 2000, "steps": 500, "backoff": 20, "workflows": 300}
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CONCURRENCY = 10
DEFAULT_POLL_S = 0.01
BACKOFF_DELAY_S = 0.25
OBSERVE_INTERVAL_S = 0.005
WATCHDOG_GRACE_S = 20.0
WORKER_STOP_GRACE_S = 5.0

PG_ADMIN_URL = os.environ.get("PEERS_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/0")

# Directory that contains the top-level ``bench`` package (needed by subprocesses).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

JsonDict = dict[str, Any]


class BenchTimeout(Exception):
    """Raised in the main thread when the hard timeout expires."""


@dataclass(frozen=True)
class Args:
    """Parsed command line of a peer module (or of its worker subprocess)."""

    workload: str
    n: int
    backend: str
    poll: float
    concurrency: int
    timeout: float
    gap: float
    state: str
    extra: str
    durability: str = ""  # "" = the peer's default; else "full" / "normal" where supported


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None, default_backend: str) -> Args:
    parser = argparse.ArgumentParser(description="peer job-queue benchmark")
    parser.add_argument("workload", choices=(*WORKLOADS, WORKER_MODE))
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--backend", default=default_backend)
    parser.add_argument(
        "--poll",
        type=float,
        default=DEFAULT_POLL_S,
        help="peer polling interval in seconds (where the peer polls)",
    )
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument(
        "--gap",
        type=float,
        default=1.0,
        help="backoff: max random pause between samples (de-phasing)",
    )
    parser.add_argument("--state", default="", help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="", help="peer-specific option")
    parser.add_argument(
        "--durability",
        default="",
        choices=("", "full", "normal"),
        help="SQLite synchronous FULL / NORMAL where the peer lets us set it "
        "(default: the peer's own default)",
    )
    ns = parser.parse_args(argv)
    n = ns.n if ns.n is not None else DEFAULT_N.get(ns.workload, 0)
    return Args(
        ns.workload,
        n,
        ns.backend,
        ns.poll,
        ns.concurrency,
        ns.timeout,
        ns.gap,
        ns.state,
        ns.extra,
        ns.durability,
    )


def worker_argv(module: str, args: Args, state: str) -> list[str]:
    """Command line that starts ``module`` in worker mode."""
    return [
        sys.executable,
        "-m",
        module,
        WORKER_MODE,
        "--backend",
        args.backend,
        "--poll",
        str(args.poll),
        "--concurrency",
        str(args.concurrency),
        "--timeout",
        str(args.timeout + 10),
        "--state",
        state,
        "--extra",
        args.extra,
        "--durability",
        args.durability,
    ]


# ----------------------------------------------------------------------- output


_RESULT_FD: int | None = None


def _claim_stdout() -> None:
    """Keep the real stdout for the result line; send everything else to stderr."""
    global _RESULT_FD
    if _RESULT_FD is not None:
        return
    sys.stdout.flush()
    _RESULT_FD = os.dup(1)
    os.dup2(2, 1)


def emit(result: JsonDict) -> None:
    line = json.dumps(result, sort_keys=False) + "\n"
    sys.stdout.flush()
    fd = _RESULT_FD if _RESULT_FD is not None else 1
    os.write(fd, line.encode())


def base_result(peer: str, args: Args, dist: str | None = None) -> JsonDict:
    out: JsonDict = {"peer": peer, "backend": args.backend, "workload": args.workload, "n": args.n}
    if dist:
        out["version"] = dist_version(dist)
    return out


def dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def unsupported(peer: str, args: Args, reason: str) -> JsonDict:
    out = base_result(peer, args)
    out.update(supported=False, note=reason)
    return out


# ------------------------------------------------------------------------ stats


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


def lateness_summary(lateness_s: list[float]) -> JsonDict:
    ms = [x * 1000.0 for x in lateness_s]
    return {
        "samples": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "min_ms": round(min(ms), 2) if ms else math.nan,
        "max_ms": round(max(ms), 2) if ms else math.nan,
    }


def throughput(n: int, elapsed_s: float) -> JsonDict:
    return {"elapsed_s": round(elapsed_s, 4), "runs_per_s": round(n / elapsed_s, 1)}


class Stopwatch:
    """Monotonic wall-clock timer."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    interval: float = OBSERVE_INTERVAL_S,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until true; raise ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def sample_gap(rng: random.Random, max_gap: float) -> None:
    """Random pause between backoff samples so they are not phase-locked to a
    peer's periodic poller/scheduler (which would bias the lateness)."""
    if max_gap > 0:
        time.sleep(rng.uniform(0.0, max_gap))


# ------------------------------------------------------------------ event files


class EventLog:
    """Append-only JSON-lines file used by worker processes to report timestamps
    (``time.time()``, comparable across processes on one machine)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, kind: str, key: str, ts: float | None = None) -> None:
        line = json.dumps({"kind": kind, "key": key, "ts": ts or time.time()}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def read(self) -> dict[tuple[str, str], float]:
        if not self.path.exists():
            return {}
        events: dict[tuple[str, str], float] = {}
        for raw in self.path.read_text().splitlines():
            if raw.strip():
                item = json.loads(raw)
                events.setdefault((item["kind"], item["key"]), item["ts"])
        return events

    def has(self, kind: str, key: str) -> bool:
        return (kind, key) in self.read()


def backoff_lateness(
    events: dict[tuple[str, str], float], keys: list[str], delay_s: float = BACKOFF_DELAY_S
) -> list[float]:
    """start(attempt 2) - end(attempt 1) - delay, per sample key."""
    return [events[("start2", k)] - events[("end1", k)] - delay_s for k in keys]


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"peers-bench-{prefix}-") as name:
        yield Path(name)


# ------------------------------------------------------------------- postgres


def pg_setting(url: str, name: str) -> str:
    """A PostgreSQL setting as a new connection to ``url`` sees it (e.g. synchronous_commit)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(f"SHOW {name}".encode()).fetchone()  # name is ours, not input
    return str(row[0]) if row else "unknown"


def _pg_url_for(dbname: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{dbname}"


def _pg_admin(sql: str) -> None:
    import psycopg  # local import: only the PG-backed peers need it

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.encode())  # identifiers are generated here, not user input


@contextlib.contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """Create a fresh PostgreSQL database, yield its URL, drop it afterwards."""
    name = f"{prefix}_{os.getpid()}"
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url_for(name)
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -------------------------------------------------------------- subprocesses


_CHILDREN: list[subprocess.Popen[bytes]] = []
_CHILDREN_LOCK = threading.Lock()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(PACKAGE_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=WORKER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=WORKER_STOP_GRACE_S)


@contextlib.contextmanager
def worker_process(
    argv: list[str], stop_signal: int = signal.SIGTERM
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a worker subprocess (stdout -> our stderr); always stopped on exit."""
    proc = subprocess.Popen(
        argv,
        cwd=PACKAGE_ROOT,
        env=_child_env(),
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr.fileno(),
    )
    with _CHILDREN_LOCK:
        _CHILDREN.append(proc)
    try:
        yield proc
    finally:
        _stop_process(proc, stop_signal)
        with _CHILDREN_LOCK:
            _CHILDREN.remove(proc)


def ensure_alive(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"worker exited early with code {proc.returncode}")


def _kill_children() -> None:
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for proc in children:
        with contextlib.suppress(Exception):
            proc.kill()


# --------------------------------------------------------------------- timeouts


def _alarm_handler(signum: int, frame: object) -> None:
    raise BenchTimeout("hard timeout expired")


def _watchdog(seconds: float, on_expire: Callable[[], None]) -> None:
    def run() -> None:
        time.sleep(seconds)
        on_expire()

    threading.Thread(target=run, name="bench-watchdog", daemon=True).start()


def _last_resort_exit() -> None:
    _kill_children()
    with contextlib.suppress(Exception):
        emit({"error": "hard timeout: watchdog forced exit"})
    os._exit(124)


def install_hard_timeout(seconds: float) -> None:
    """SIGALRM-based soft stop, then a watchdog thread that forces exit."""
    signal.signal(signal.SIGALRM, _alarm_handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    _watchdog(seconds + WATCHDOG_GRACE_S, _last_resort_exit)


def _parent_watch(parent_pid: int) -> None:
    def run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=run, name="bench-parent-watch", daemon=True).start()


def install_worker_guards(timeout: float) -> None:
    """Worker subprocesses exit when their parent dies or after ``timeout``."""
    _parent_watch(os.getppid())
    _watchdog(timeout, lambda: os._exit(124))


# ------------------------------------------------------------------------- main


Runner = Callable[[Args], JsonDict]


def run_main(
    peer: str,
    default_backend: str,
    bench: Runner,
    worker: Runner | None = None,
    argv: list[str] | None = None,
) -> int:
    """Entry point shared by all peer modules."""
    args = parse_args(argv, default_backend)
    if args.workload == WORKER_MODE:
        if worker is None:
            raise SystemExit(f"{peer} has no worker mode")
        install_worker_guards(args.timeout)
        worker(args)
        return 0
    _claim_stdout()
    install_hard_timeout(args.timeout)
    try:
        result = bench(args)
    except Exception as exc:  # reported as JSON (includes BenchTimeout)
        result = base_result(peer, args)
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    emit(result)
    return 1 if "error" in result else 0
