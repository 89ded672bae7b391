"""Three worker processes fire a schedule that ticks every second; one is SIGKILLed
midway. Every tick from the declaration to the end starts exactly one run, none is
lost, and each run completes."""

from __future__ import annotations

import signal
import time

import pytest

from retrier import Completed, Success
from retrier._schedules import tick_run_id
from tests.cron_app import build
from tests.test_processes import column, scalar, start_worker, wait_for

pytestmark = pytest.mark.processes

SECONDS = 6  # of real per-second ticks once every worker is up


def test_each_tick_fires_once_across_workers_with_one_killed(db_url: str) -> None:
    app = build(db_url)
    declared = app.schedule("every-second", "beat", {}, cron="* * * * * *")
    first_tick = round(declared.next_fire.timestamp() * 1000)  # type: ignore[union-attr]
    workers = [start_worker(db_url, "tests.cron_app:retrier") for _ in range(3)]
    victim = workers[0]
    try:
        wait_for(lambda: scalar(app, "SELECT count(*) FROM tiers_workers") == 3, 30,
                 "three live workers")
        time.sleep(SECONDS / 2)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = round(time.time() * 1000)
        time.sleep(SECONDS / 2)
        app.pause_schedule("every-second")
        last = app.get_schedule("every-second").last_fire
        assert last is not None
        last_tick = round(last.timestamp() * 1000)
        ticks = range(first_tick, last_tick + 1, 1000)
        assert len(ticks) >= SECONDS, "the schedule should have fired all along"
        assert last_tick >= killed_at, "the ticks after the kill should have fired"

        fired = column(app, "SELECT id FROM tiers_runs WHERE fn = 'beat'")
        assert set(fired) == {tick_run_id("every-second", t) for t in ticks}, (
            "each tick must start exactly one run, with none lost"
        )
        app.wait_all(list(fired), timeout=60)
        for run_id in fired:
            status = app.status(run_id)
            assert isinstance(status, Completed) and isinstance(status.result, Success)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers[1:]:
            assert w.wait(30) == 0, "a worker did not shut down cleanly on SIGTERM"
        app.close()
