"""Every example runs as written (on SQLite) and shows what it claims to."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "TIERS_LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, f"examples/{name}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_poll_status() -> None:
    out = run_example("poll_status.py")
    assert "InProgress" in out and "Success" in out
    assert "attempts: 3" in out
    assert "after cleanup: no run with id" in out


def test_transactional_on_complete() -> None:
    out = run_example("transactional_on_complete.py")
    assert "order 1: ann 42 -> paid (ch_ann_42)" in out


def test_fastapi_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERS_DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("examples.fastapi_app", None)
    from fastapi.testclient import TestClient

    from examples.fastapi_app import app, retrier

    try:
        with TestClient(app) as client:
            created = client.post("/signups", json={"email": "ann@example.com"})
            assert created.status_code == 201
            run_id = created.json()["run_id"]
            deadline = time.monotonic() + 10
            while (body := client.get(f"/runs/{run_id}").json())["state"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert body == {"state": "completed", "outcome": "success",
                            "value": {"sent_to": "ann@example.com"}}
            assert client.get("/runs/nope").status_code == 404
    finally:
        retrier.close()
        sys.modules.pop("examples.fastapi_app", None)


def test_compare_tiers_shows_what_each_tier_costs() -> None:
    out = run_example("compare_tiers.py", "--orders", "12")
    rows = {line.split()[1]: line.split() for line in out.splitlines()
            if line.startswith("│") and line.split()[1] in ("retrier", "workpool", "workflow")}
    # columns: tier, succeeded, runs, charges, emails, extra side effects, most at once
    def col(tier: str, index: int) -> str:
        return [c for c in rows[tier] if c != "│"][index]

    for tier in ("retrier", "workpool", "workflow"):
        assert col(tier, 1) == "12/12"
    assert col("retrier", 3) == col("workpool", 3) == "24", "whole-action retries charge twice"
    assert col("workflow", 3) == col("workflow", 4) == "12", "steps charge and email once"
    assert col("workflow", 5) == "0"
    assert int(col("workpool", 6)) <= 4 and int(col("workflow", 6)) <= 4, "the pool cap holds"


def test_fan_out_pool_respects_its_cap() -> None:
    out = run_example("fan_out_pool.py")
    assert out.count(".thumb.png") == 20
    assert "20 thumbnails, at most 3 at once (cap 3)" in out


def test_approval_workflow_approves_or_escalates() -> None:
    out = run_example("approval_workflow.py")
    assert "[r1] paid, approved by ann" in out
    assert "[r2] no answer in time: escalated to finance" in out


def test_drip_campaign_sleeps_between_steps() -> None:
    out = run_example("drip_campaign.py")
    lines = [line.split() for line in out.splitlines() if " s  " in line]
    sent = [(float(at), to, template) for at, _, to, template in lines]
    assert [t for _, to, t in sent if to == "ann@example.com"] == [
        "welcome", "tips-trial", "upgrade-offer"]
    assert [t for _, to, t in sent if to == "bob@example.com"] == ["welcome", "tips-pro"]
    times = {(to, t): at for at, to, t in sent}
    # two "days" (0.6 s) after the welcome; three more before the offer
    assert times[("ann@example.com", "tips-trial")] - times[("ann@example.com", "welcome")] >= 0.6
    assert (times[("ann@example.com", "upgrade-offer")]
            - times[("ann@example.com", "tips-trial")]) >= 0.9


def test_batch_import_retries_only_the_failed_batch() -> None:
    out = run_example("batch_import.py")
    assert "imported: Success(value=1000" in out
    assert "rows imported per batch: [100]; calls of batch 4: 2, of the others: 1" in out


def test_the_readme_snippet_runs_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## A taste of each tier")[1].split("```python")[1].split("```")[0]
    script = tmp_path / "taste.py"
    script.write_text(snippet)
    env = {**os.environ, "TIERS_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tiers.db").exists()


def test_workflow_lifecycle_restarts_and_checks() -> None:
    out = run_example("workflow_lifecycle.py")
    assert "StepFailed: step 'save-order[0]' failed" in out
    assert out.count("charged o1") == 1 and out.count("emailed the receipt of o1") == 2
    assert "-> Success(value='saved o1'" in out
    assert "check with the patched change: ok=True" in out
    assert "check with the unpatched change: diverged at wait-a-week[0]: step 'survey[0]'" in out


def test_the_cron_schedules_snippet_runs_as_written(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "retrier.md").read_text()
    snippet = doc.split("## Cron schedules")[1].split("```python")[1].split("```")[0]
    script = tmp_path / "cron.py"
    script.write_text(snippet)
    env = {**os.environ, "TIERS_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(("03:00:00+01:00", "03:00:00+02:00")), done.stdout
