"""The `tiers` command line, against a real database."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrier import Retrier
from retrier._cli import main
from tests.support import drain


def test_runs_list_show_cancel_cleanup(retrier: Retrier, db_url: str) -> None:
    @retrier.action(name="greet")
    def greet(name: str) -> str:
        if name == "bad":
            raise RuntimeError("cannot greet bad")
        return f"hi {name}"

    done = retrier.run(greet, {"name": "ann"})
    failed = retrier.run(greet, {"name": "bad"}, max_failures=1)
    later = retrier.run_after(timedelta(hours=1), greet, {"name": "zed"})
    drain(retrier)
    cli = CliRunner()

    listed = cli.invoke(main, ["--db", db_url, "runs", "list"])
    assert listed.exit_code == 0, listed.output
    for run_id in (done, failed, later):
        assert run_id in listed.output
    assert "3 run(s)" in listed.output

    pending = cli.invoke(main, ["--db", db_url, "runs", "list", "--state", "pending"])
    assert later in pending.output and done not in pending.output

    shown = cli.invoke(main, ["--db", db_url, "runs", "show", failed])
    assert shown.exit_code == 0
    assert "RuntimeError: cannot greet bad" in shown.output and "attempts" in shown.output

    canceled = cli.invoke(main, ["--db", db_url, "runs", "cancel", later])
    assert canceled.exit_code == 0 and "canceled" in canceled.output
    assert retrier.store.get(later).outcome == "canceled"

    cleaned = cli.invoke(main, ["--db", db_url, "runs", "cleanup", done])
    assert cleaned.exit_code == 0 and "deleted 1 run(s)" in cleaned.output
    missing = cli.invoke(main, ["--db", db_url, "runs", "show", done])
    assert missing.exit_code == 1 and "no run with id" in missing.output

    purge = cli.invoke(main, ["--db", db_url, "runs", "cleanup", "--older-than", "0"])
    assert purge.exit_code == 0 and "deleted 2 run(s)" in purge.output


def test_cli_needs_a_database() -> None:
    result = CliRunner().invoke(main, ["runs", "list"], env={"TIERS_DATABASE_URL": ""})
    assert result.exit_code != 0
    assert "--db" in result.output


def test_worker_rejects_a_bad_app_spec() -> None:
    result = CliRunner().invoke(main, ["worker", "no_such_module:retrier"])
    assert result.exit_code != 0
    assert "cannot import" in result.output


def test_a_worker_waits_for_a_database_that_does_not_answer_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started with (or during a restart of) its database server, a worker retries
    building its app instead of exiting."""
    from retrier import _cli

    missing_dir = tmp_path / "not-yet"
    url = f"sqlite:///{missing_dir / 'tiers.db'}"
    tries: list[int] = []

    def load(spec: str) -> Retrier:
        tries.append(1)
        if len(tries) == 3:
            missing_dir.mkdir()  # the "server" is up now
        return Retrier(url)

    monkeypatch.setattr(_cli, "load_app", load)
    monkeypatch.setattr(_cli.time, "sleep", lambda s: None)
    app = _cli.load_app_waiting_for_database("x:y")
    assert isinstance(app, Retrier) and len(tries) == 3
    app.close()
    with pytest.raises(ValueError):
        monkeypatch.setattr(_cli, "load_app", lambda spec: (_ for _ in ()).throw(ValueError()))
        _cli.load_app_waiting_for_database("x:y")
