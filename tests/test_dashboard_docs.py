"""docs/dashboard.md as written: the mounting snippet, and `tiers dashboard`."""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "dashboard.md").read_text()


def test_the_mounting_snippet_runs_as_written(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    snippet = DOC.split("## Mount it in your app")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(_write(tmp_path / "app.py", snippet))
    try:
        with TestClient(names["app"]) as c:
            page = c.get("/tiers/runs")
            assert page.status_code == 200 and 'href="/tiers/workers"' in page.text
            token = c.cookies.get("tiers_csrf")
            refused = c.post("/tiers/pools/x/cap", data={"csrf": token, "max_parallelism": "1"})
            assert refused.status_code == 403  # not one of is_admin's users
    finally:
        names["retrier"].close()


def test_tiers_dashboard_serves_on_localhost(tmp_path: Path) -> None:
    from retrier import Retrier

    url = f"sqlite:///{tmp_path / 'tiers.db'}"
    Retrier(url).close()  # the dashboard never creates a database: make one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TIERS_DASHBOARD_TOKEN": "a-long-enough-token"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrier", "dashboard", "--db", url, "--port", str(port)],
        env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline, body = time.monotonic() + 20, ""
        while time.monotonic() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/workers", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.2)
        assert "Workers" in body and "log in to act" in body
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert f"dashboard on http://127.0.0.1:{port}/" in err


def test_tiers_dashboard_refuses_a_missing_database(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "retrier", "dashboard", "--db",
         f"sqlite:///{tmp_path / 'none.db'}"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1 and "error:" in done.stderr
    assert not (tmp_path / "none.db").exists()


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)
