"""Real worker processes: 3 `tiers worker` processes run 200 five-step workflows with
injected step failures while one of them is SIGKILLed."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from retrier import Completed, Success
from retrier._tables import attempts_t
from workflow._models import steps_t

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_three_workers_one_killed_every_workflow_completes_exactly_once(db_url: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    app = importlib.import_module("tests.workflow_app")
    workflows = app.build(db_url)
    retrier = workflows.retrier
    env = {**os.environ, "TIERS_WF_TEST_DB": db_url, "TIERS_LOG_LEVEL": "ERROR"}
    cmd = [
        sys.executable,
        "-m",
        "retrier",
        "worker",
        "tests.workflow_app:workflows",
        "--lease",
        "2",
    ]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env) for _ in range(3)]
    try:
        labels = [f"w{i}" for i in range(120)]
        ids = {
            label: workflows.start(
                "five", {"label": label}, on_complete="record_completion",
                idempotency_key=label,
            )
            for label in labels
        }
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill one worker once work is under way
            if len(workflows.list(state="completed", limit=500)) >= 30:
                break
            time.sleep(0.02)
        procs[0].send_signal(signal.SIGKILL)
        for label, wf_id in ids.items():
            left = max(1.0, deadline - time.monotonic())
            assert workflows.wait(wf_id, timeout=left) == Completed(Success(10)), label
    finally:
        for p in procs[1:]:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    with retrier.engine.connect() as conn:
        done = Counter(r.workflow_id for r in conn.execute(select(app.completions)))
        effects = Counter(
            (r.label, r.step) for r in conn.execute(select(app.side_effects)) if r.kind == "ok"
        )
        journal = {
            (r.workflow_id, r.name): r
            for r in conn.execute(
                select(steps_t.c.workflow_id, steps_t.c.name, steps_t.c.run_id, steps_t.c.state)
            )
        }
        lost = Counter(
            r.run_id
            for r in conn.execute(select(attempts_t.c.run_id, attempts_t.c.outcome))
            if r.outcome == "lost"
        )
    assert done == Counter(ids.values()), "each on_complete exactly once"
    for label, wf_id in ids.items():
        for i in range(5):
            entry = journal[(wf_id, f"s{i}[0]")]
            assert entry.state == "completed"
            # Exactly once per successful attempt: more only if an attempt was lost
            # (its worker killed after the side effect, before recording it).
            assert 1 <= effects[(label, i)] <= 1 + lost[entry.run_id], (label, i)
    retrier.close()
