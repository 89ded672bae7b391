"""Benchmark harnesses for peer job-queue / durable-execution libraries.

Each module ``bench.peers.<name>`` is runnable as
``python -m bench.peers.<name> <workload> [--n N] [--backend B]`` and prints one JSON
line.  :func:`run_peer` runs one of them in a subprocess with the current interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

PEER_MODULES = ("dbos_peer", "huey_peer", "procrastinate_peer", "celery_peer", "tenacity_peer")
_ROOT = Path(__file__).resolve().parents[2]  # directory containing ``bench/``
_KILL_GRACE_S = 30.0


def _command(
    module: str,
    workload: str,
    n: int | None,
    backend: str | None,
    timeout: float,
    extra: list[str] | None,
) -> list[str]:
    cmd = [sys.executable, "-m", f"bench.peers.{module}", workload, "--timeout", str(timeout)]
    if n is not None:
        cmd += ["--n", str(n)]
    if backend is not None:
        cmd += ["--backend", backend]
    return cmd + list(extra or [])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + path if path else "")
    return env


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _parse(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return {"error": "no output"}
    parsed = json.loads(lines[-1])
    return parsed if isinstance(parsed, dict) else {"error": f"unexpected output: {lines[-1]}"}


def run_peer(
    module: str,
    workload: str,
    n: int | None = None,
    backend: str | None = None,
    timeout: float = 300,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m bench.peers.<module>`` and return its JSON result.

    The child gets ``timeout`` as its own hard limit; this function waits a little
    longer, then kills the child's whole process group (the child and any worker
    subprocesses it started).  Returns ``{"error": ...}`` on failure or timeout.
    """
    if module not in PEER_MODULES:
        return {"error": f"unknown peer module {module!r}"}
    cmd = _command(module, workload, n, backend, timeout, extra)
    proc = subprocess.Popen(
        cmd,
        cwd=_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout + _KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return {"error": f"timeout after {timeout + _KILL_GRACE_S:.0f}s", "module": module}
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    try:
        result = _parse(stdout)
    except json.JSONDecodeError as exc:
        return {"error": f"bad JSON from {module}: {exc}", "stderr_tail": stderr[-2000:]}
    if proc.returncode != 0 and "error" not in result:
        result["error"] = f"exit code {proc.returncode}"
    if "error" in result:
        result.setdefault("stderr_tail", stderr[-2000:])
    return result


__all__ = ["PEER_MODULES", "run_peer"]
