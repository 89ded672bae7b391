"""A workflow's deadline outlives every process: the worker that ran it is SIGKILLed
while it sleeps, and a worker started afterwards fails it at its deadline, calling
its on_complete exactly once."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from retrier import Completed, Failed
from retrier._tables import workers_t

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_a_deadline_outlives_the_killed_worker(db_url: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    app = importlib.import_module("tests.timeouts_app")
    workflows = app.build(db_url)
    env = {**os.environ, "TIERS_TIMEOUTS_TEST_DB": db_url, "TIERS_LOG_LEVEL": "ERROR"}
    cmd = [sys.executable, "-m", "retrier", "worker", "tests.timeouts_app:workflows"]

    first = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        give_up = time.monotonic() + 60
        while not live_workers(workflows):  # its start-up is slow on a loaded machine
            assert time.monotonic() < give_up, "the first worker never started"
            time.sleep(0.05)
        wf_id = workflows.start("sleeper", on_complete="record_end", timeout=4)
        while not any(s.name == "nap[0]" for s in workflows.steps(wf_id)):
            assert time.monotonic() < give_up, "the first worker never ran the workflow"
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert workflows.steps(wf_id)[0].state == "waiting"

    second = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        status = workflows.wait(wf_id, timeout=60)
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert status.result.error.startswith(
        "DeadlineExceeded: the workflow ran past its deadline (4 s after its start"
    )
    with workflows.retrier.engine.connect() as conn:
        ends = [(r.workflow_id, r.outcome, r.error) for r in conn.execute(select(app.completions))]
    assert ends == [(wf_id, "failed", status.result.error)]
    workflows.retrier.close()


def live_workers(workflows: Any) -> int:
    with workflows.retrier.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(workers_t)).scalar_one())
