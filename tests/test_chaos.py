"""The chaos harness of bench/chaos.py, short: 3 worker processes, 6 SIGKILLs.

300 retrier runs, 60 items of a pool capped at 3 and 30 four-step workflows, with 30%
of attempts failing, run on real `tiers worker` processes while a worker is SIGKILLed
every 0.2 s (one holding running runs when there is one) and replaced; on PostgreSQL
the workers' backends are also terminated once. Every check of the long run must
hold: nothing lost, no duplicate on_complete commit, no attempt over the policy,
nothing stuck, the caps held (the capped pool's and the steps' pool's), no step re-run
after being journaled.
`python -m bench.chaos` is the long version (100 kills on PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import Settings, run_chaos
from bench.chaos_db import database_for

pytestmark = pytest.mark.processes

# Concurrency 4 keeps each worker's connections down (about 14 each at 8, measured):
# the shared server's 100 serve everything else that runs there too.
SHORT = Settings(
    runs=300, items=60, workflows=30, workers=3, concurrency=4, kills=6, kill_every=0.2,
    disruptions=1, drain_timeout=40,
)


@pytest.mark.timeout(90)
def test_a_short_sigkill_storm_loses_and_doubles_nothing(db_url: str, tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_chaos(SHORT, database_for(db_url), tmp_path, say=lines.append)
    assert report.ok, "\n".join([*lines, report.render(), f"worker logs: {tmp_path / 'logs'}"])
    assert len(report.checks) == 11
    assert report.kills == SHORT.kills
    assert report.lost_attempts > 0, "the kills interrupted running attempts"
