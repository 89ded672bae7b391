"""The dashboard in a real browser (Debian's chromium, driven by selenium), against a
uvicorn server in a thread and a live in-process worker: every page loads, a run is
canceled, a pool's cap changed, an event sent to a workflow (which then finishes,
seen through the page's own live updates). Screenshots go to a temporary folder;
`TIERS_SCREENSHOTS=docs/screenshots pytest tests/test_dashboard_browser.py` refreshes
the README's.

Skipped when chromium or chromedriver is missing, except with CI=true, where it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-test-token"


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install -y chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    problem = _missing()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true but the browser test cannot run: {problem}")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(Path("/tmp/.org.chromium.Chromium"), ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    import uvicorn

    from retrier.dashboard import create_app
    from tests.dashboard_data import build, populate

    url = f"sqlite:///{tmp_path / 'tiers.db'}"
    demo = build(url)
    demo.ids.update(populate(demo))
    port = _free_port()
    config = uvicorn.Config(create_app(url, token=TOKEN), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    with demo.retrier:  # a live worker: the pages have something to show moving
        thread.start()
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.started, "uvicorn did not start"
        try:
            yield f"http://127.0.0.1:{port}", demo
        finally:
            srv.should_exit = True
            thread.join(10)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until `check()` holds; a page that changes under it (a navigation, the live
    refresh replacing an element) just means: look again."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (StaleElementReferenceException, NoSuchElementException):
            pass
        except WebDriverException as exc:
            # Chromium's way of saying "stale" when the document was replaced between
            # finding an element and reading it (a navigation under way).
            if "does not belong to the document" not in str(exc):
                raise
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_the_dashboard_in_a_browser(
    browser: Any, server: tuple[str, Any], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    base, demo = server
    ids = demo.ids
    shots = Path(os.environ.get("TIERS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    def text() -> str:
        return str(browser.find_element(By.TAG_NAME, "body").text)

    def shot(name: str) -> None:
        browser.save_screenshot(str(shots / f"{name}.png"))

    # Log in (the token from TIERS_DASHBOARD_TOKEN), landing on the overview.
    browser.get(f"{base}/login?next=/")
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form.card button").click()
    wait_for(lambda: "logged in" in text())
    wait_for(lambda: "Live workers (1)" in text())
    assert "succeeded/min" in browser.page_source
    shot("overview")

    browser.get(f"{base}/runs")
    assert "charge_card" in text() and "tiers.workflow.drive" not in text()
    shot("runs")

    browser.get(f"{base}/runs/{ids['failed']}")
    assert "410 Gone" in text()
    browser.find_element(By.CSS_SELECTOR, "details summary").click()  # its traceback
    shot("run")

    browser.get(f"{base}/workers")
    assert "charge_card" in text()
    shot("workers")

    # Cancel a run (confirming the dialog).
    browser.get(f"{base}/runs/{ids['scheduled']}")
    browser.find_element(By.XPATH, "//button[text()='Cancel run']").click()
    browser.switch_to.alert.accept()
    wait_for(lambda: "canceled" in text())
    assert demo.retrier.store.get(ids["scheduled"]).outcome == "canceled"

    # Change a paused pool's cap: its items then run.
    browser.get(f"{base}/pools/emails")
    assert "paused" in text()
    cap = browser.find_element(By.NAME, "max_parallelism")
    cap.clear()
    cap.send_keys("3")
    browser.find_element(By.CSS_SELECTOR, "#cap-form button").click()
    wait_for(lambda: "cap set to 3" in text())
    assert demo.retrier.store.get_queue("emails").max_parallelism == 3
    wait_for(lambda: all(demo.retrier.store.get(i).state == "completed"
                         for i in ids["pool_items"]))
    browser.get(f"{base}/pools")
    shot("pools")

    # Send the awaited event to a workflow; the page sees it finish without a reload.
    browser.get(f"{base}/workflows/{ids['waiting_workflow']}")
    assert "Waiting for" in text()
    shot("workflow-waiting")
    data = browser.find_element(By.CSS_SELECTOR, "#event-form input[name=data]")
    data.clear()
    data.send_keys('{"order_id": "o-200", "by": "browser"}')
    browser.find_element(By.CSS_SELECTOR, "#event-form button").click()
    wait_for(lambda: "sent event" in text())
    wait_for(lambda: "approved by browser" in text(), timeout=15)  # live update, no reload
    shot("workflow")

    browser.get(f"{base}/workflows")
    assert "approve_order" in text()
    shot("workflows")
