"""Real worker processes, one of them SIGKILLed mid-action: nothing lost, nothing doubled.

Three `python -m retrier worker` processes share one database (a SQLite file, or
PostgreSQL); 1,000 runs with injected failures; one worker is killed while it holds
runs. Every run must complete, every on_complete must commit exactly once, and only
the killed worker's in-flight runs may have run an extra time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from retrier import Completed, Retrier, Success
from tests.proc_app import build

ROOT = Path(__file__).resolve().parent.parent
N = 1000

pytestmark = pytest.mark.processes


def start_worker(db_url: str, app: str = "tests.proc_app:retrier") -> subprocess.Popen[bytes]:
    env = {**os.environ, "TIERS_TEST_DB": db_url, "TIERS_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, "-m", "retrier", "worker", app, "--concurrency", "8"],
        cwd=ROOT,
        env=env,
    )


def scalar(retrier: Retrier, sql: str, **params: object) -> int:
    with retrier.engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar() or 0)


def column(retrier: Retrier, sql: str) -> Counter[object]:
    """How often each value of a one-column query occurs."""
    with retrier.engine.connect() as conn:
        return Counter(value for (value,) in conn.execute(text(sql)))


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_sigkilled_worker_loses_nothing_and_doubles_nothing(db_url: str) -> None:
    app = build(db_url)
    workers = [start_worker(db_url) for _ in range(3)]
    victim = workers[0]
    try:
        ids = {}
        for n in range(N):
            ids[n] = app.run("flaky", {"n": n, "slow": n % 40 == 0}, on_complete="completed",
                             context={"n": n})

        def victim_is_mid_action() -> bool:
            held = scalar(app, "SELECT count(*) FROM tiers_runs WHERE state = 'running' "
                               "AND lease_owner LIKE :p", p=f"%:{victim.pid}:%")
            done = scalar(app, "SELECT count(*) FROM tiers_runs WHERE state = 'completed'")
            return held > 0 and done >= N // 5

        wait_for(victim_is_mid_action, 60, "the victim worker to hold runs")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        app.wait_all(list(ids.values()), timeout=120)

        for n, run_id in ids.items():
            assert app.status(run_id) == Completed(Success(n))
        completions = column(app, "SELECT run_id FROM test_completions")
        assert set(completions) == set(ids.values())
        assert max(completions.values()) == 1, "an on_complete committed twice"

        lost = column(app, "SELECT run_id FROM tiers_attempts WHERE outcome = 'lost'")
        assert lost, "the kill should have interrupted at least one attempt"
        effects = column(app, "SELECT n FROM test_effects")
        for n, run_id in ids.items():
            expected = 2 if n % 5 == 0 else 1
            if lost[run_id]:
                assert expected <= effects[n] <= expected + lost[run_id]
            else:
                assert effects[n] == expected, f"run {n} ran {effects[n]} times"
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers[1:]:
            assert w.wait(30) == 0, "a worker did not shut down cleanly on SIGTERM"
        app.close()


def test_a_second_signal_stops_the_worker_now_and_releases_its_async_attempts(
    db_url: str,
) -> None:
    """SIGTERM lets running work finish (async work for up to the grace period); a
    second SIGTERM stops the worker now: its async attempts are interrupted and
    recorded as released, so the runs are pending again at once, held by no one, as if
    never started, instead of leased until their leases expire (on the code before,
    the second signal exited with the runs still running)."""
    app = build(db_url)
    worker = start_worker(db_url)
    try:
        ids = [app.run("hangs", {"n": n}) for n in range(3)]
        wait_for(lambda: scalar(app, "SELECT count(*) FROM tiers_runs WHERE state = 'running'")
                 == 3, 60, "the worker to start the runs")
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the first signal only stops claiming: the runs hang on
        assert worker.poll() is None, f"the worker waits for its running work ({worker.poll()})"
        assert scalar(app, "SELECT count(*) FROM tiers_runs WHERE state = 'running'") == 3
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 1, "a forced stop exits with status 1"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    rows = [app.store.get(run_id) for run_id in ids]
    # As if never started: no attempt counted or stored.
    assert [(r.state, r.attempts, r.failures, r.lease_owner) for r in rows] == [
        ("pending", 0, 0, None)
    ] * 3
    assert scalar(app, "SELECT count(*) FROM tiers_attempts") == 0
