"""The web dashboard through Starlette's TestClient, on SQLite and PostgreSQL: its
pages, its actions, and its safety (authentication, CSRF, read-only, no password)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.testclient import TestClient

from retrier import testing
from retrier.dashboard import create_app
from tests.dashboard_data import Demo, build, populate

TOKEN = "s3cret-dashboard-token"


@pytest.fixture
def demo(db_url: str) -> Iterator[Demo]:
    made = build(db_url)
    made.ids.update(populate(made))
    yield made
    made.retrier.close()


def client(demo: Demo, **options: Any) -> TestClient:
    options.setdefault("token", TOKEN)
    return TestClient(create_app(demo.retrier.store.url, **options))


def csrf(c: TestClient, page: str = "/") -> str:
    assert c.get(page).status_code == 200
    value = c.cookies.get("tiers_csrf")
    assert value
    return value


def log_in(c: TestClient) -> str:
    token = csrf(c, "/login")
    r = c.post("/login", data={"csrf": token, "token": TOKEN, "next": "/runs"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/runs"
    return token


def state_of(demo: Demo, run_id: str) -> tuple[str, str | None]:
    row = demo.retrier.store.get(run_id)
    return row.state, row.outcome


# -- pages --------------------------------------------------------------------------


def test_every_page_renders(demo: Demo) -> None:
    ids = demo.ids
    with client(demo) as c:
        overview = c.get("/").text
        assert "Overview" in overview and "<svg" in overview and "Live workers" in overview
        failed = c.get(f"/runs/{ids['failed']}").text
        assert "410 Gone" in failed and "traceback" in failed and "log_outcome" in failed
        assert "hooks.example.com" in failed  # args
        assert "o-200" in c.get(f"/workflows/{ids['waiting_workflow']}").text
        waiting = c.get(f"/workflows/{ids['waiting_workflow']}").text
        assert "Waiting for" in waiting and "approved" in waiting
        done = c.get(f"/workflows/{ids['done_workflow']}").text
        assert "approved by ana" in done and "<svg" in done
        pools = c.get("/pools").text
        assert "emails" in pools and "paused" in pools and "100 per 1 min" in pools
        assert "orders" in c.get("/pools/orders").text
        assert c.get("/workers").status_code == 200
        scheduled = c.get(f"/runs/{ids['scheduled']}").text  # why it waits (explain)
        assert "due_later" in scheduled and "run_at" in scheduled
        assert c.get("/runs/nope").status_code == 404
        assert c.get("/workflows/nope").status_code == 404
        assert c.get("/pools/nope").status_code == 404


def test_a_workflows_page_shows_its_progress_and_log_lines(demo: Demo) -> None:
    with client(demo) as c:
        page = c.get(f"/workflows/{demo.ids['waiting_workflow']}").text
    assert "progress" in page and "awaiting approval" in page
    assert "charged order o-200" in page and "charge[0]" in page


def test_the_watch_endpoint_streams_server_sent_events_until_the_end(demo: Demo) -> None:
    done = demo.ids["done_workflow"]
    with client(demo) as c:
        with c.stream("GET", f"/workflows/{done}/watch") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            body = "".join(r.iter_text())
        assert c.get("/workflows/nope/watch").status_code == 404
    blocks = [b for b in body.split("\n\n") if b]
    kinds = [b.splitlines()[0] for b in blocks]
    assert kinds[-2:] == ["event: status", "event: end"]
    assert "event: log" in kinds and "event: progress" in kinds
    assert kinds.count("event: step") == 3  # charge, approval, email
    assert '"state": "completed"' in blocks[-2] and '"result": "approved by ana"' in blocks[-2]


def test_runs_filter_by_state_function_and_queue_and_hide_drivers(demo: Demo) -> None:
    ids = demo.ids
    with client(demo) as c:
        default = c.get("/runs").text
        assert "tiers.workflow.drive:" not in default
        assert "tiers.workflow.drive:" in c.get("/runs?internal=1").text
        failed = c.get("/runs?state=failed").text
        assert ids["failed"][-12:] in failed and ids["succeeded"][0][-12:] not in failed
        by_fn = c.get("/runs?fn=charge_card").text
        assert ids["succeeded"][0][-12:] in by_fn and ids["failed"][-12:] not in by_fn
        pooled = c.get("/runs?queue=emails").text
        assert all(i[-12:] in pooled for i in ids["pool_items"])
        assert ids["scheduled"][-12:] not in pooled
        assert ids["scheduled"][-12:] in c.get("/runs?queue=(retrier)").text
        assert c.get("/runs?state=bogus").status_code == 400


def test_the_live_part_alone_for_polling(demo: Demo) -> None:
    with client(demo) as c:
        part = c.get("/runs", headers={"X-Tiers-Live": "1"})
        assert part.status_code == 200
        assert "<html" not in part.text and "<table" in part.text
        full = c.get("/runs")
        assert 'data-live="2000"' in full.text and "live.js" in full.text
        assert "frame-ancestors 'none'" in full.headers["content-security-policy"]
        assert c.get("/static/live.js").status_code == 200


# -- actions ------------------------------------------------------------------------


def test_cancel_and_retry_a_run(demo: Demo) -> None:
    ids = demo.ids
    with client(demo) as c:
        token = log_in(c)
        page = c.get(f"/runs/{ids['scheduled']}").text
        assert "Cancel run" in page
        r = c.post(f"/runs/{ids['scheduled']}/cancel", data={"csrf": token})
        assert r.status_code == 200 and "canceled" in r.text  # followed to the run page
        assert state_of(demo, ids["scheduled"]) == ("completed", "canceled")

        assert "Retry now" in c.get(f"/runs/{ids['failed']}").text
        c.post(f"/runs/{ids['failed']}/retry", data={"csrf": token})
        assert state_of(demo, ids["failed"]) == ("pending", None)
        again = c.post(f"/runs/{ids['succeeded'][0]}/retry", data={"csrf": token})
        assert "cannot be retried" in again.text  # told, not a crash
        assert state_of(demo, ids["succeeded"][0]) == ("completed", "success")


def test_change_pause_and_resume_a_pool(demo: Demo) -> None:
    store = demo.retrier.store
    with client(demo) as c:
        token = log_in(c)
        r = c.post("/pools/emails/cap", data={"csrf": token, "max_parallelism": "3"})
        assert "cap set to 3" in r.text
        assert store.get_queue("emails").max_parallelism == 3  # type: ignore[union-attr]
        c.post("/pools/emails/pause", data={"csrf": token})
        assert store.get_queue("emails").max_parallelism == 0  # type: ignore[union-attr]
        bad = c.post("/pools/emails/cap", data={"csrf": token, "max_parallelism": "-1"})
        assert "max_parallelism must be" in bad.text
        c.post("/pools/emails/cap", data={"csrf": token, "max_parallelism": "5"})
        limits = store.get_queue("emails")
        assert limits is not None
        assert (limits.max_parallelism, limits.max_per_key, limits.rate_limit) == (5, 2, 100)


def test_send_an_event_and_cancel_a_workflow(demo: Demo) -> None:
    ids, workflows = demo.ids, demo.workflows
    waiting = ids["waiting_workflow"]
    with client(demo) as c:
        token = log_in(c)
        page = c.get(f"/workflows/{waiting}").text
        assert 'value="approved"' in page  # the form offers the awaited event
        assert 'value="{&#34;order_id&#34;: &#34;o-200&#34;}"' in page  # and its match
        bad = c.post(f"/workflows/{waiting}/events",
                     data={"csrf": token, "name": "approved", "data": "[1]"})
        assert "JSON object" in bad.text
        r = c.post(f"/workflows/{waiting}/events", data={
            "csrf": token, "name": "approved", "data": '{"order_id": "o-200", "by": "bo"}'})
        assert "sent event" in r.text
        testing.drain(demo.retrier)
        assert workflows.status(waiting).result.value == "approved by bo"  # type: ignore[union-attr]

        other = workflows.start(ids["approve_order"], {"order_id": "o-300"})
        testing.drain(demo.retrier)
        c.post(f"/workflows/{other}/cancel", data={"csrf": token})
        assert workflows.list(state="canceled")[0].id == other


def test_restart_a_finished_workflow_from_a_step(demo: Demo) -> None:
    ids, workflows = demo.ids, demo.workflows
    done = ids["done_workflow"]
    before = {s.name: s for s in workflows.steps(done)}
    with client(demo) as c:
        token = log_in(c)
        page = c.get(f"/workflows/{done}").text
        assert "Restart from step" in page and '<option value="email[0]" selected>' in page
        assert "Restart from step" not in c.get(f"/workflows/{ids['waiting_workflow']}").text
        bad = c.post(f"/workflows/{done}/restart", data={"csrf": token, "step": "nope"})
        assert "no journaled step &#39;nope&#39;" in bad.text
        running = c.post(f"/workflows/{ids['waiting_workflow']}/restart",
                         data={"csrf": token, "step": "charge"})
        assert "is running; cancel it" in running.text
        r = c.post(f"/workflows/{done}/restart", data={"csrf": token, "step": "email[0]"})
        assert r.status_code == 200 and "restarted from email[0]" in r.text
    testing.drain(demo.retrier)
    after = {s.name: s for s in workflows.steps(done)}
    assert workflows.status(done).result.value == "approved by ana"  # type: ignore[union-attr]
    # The journal before the step is kept; log lines are the new run's (re-logged).
    for name in ("charge[0]", "approval[0]"):
        assert replace(after[name], logs=()) == replace(before[name], logs=())
    assert [x.message for x in after["charge[0]"].logs] == ["charged order o-100"]
    assert after["email[0]"].run_id != before["email[0]"].run_id


# -- safety -------------------------------------------------------------------------


def test_actions_need_authentication(demo: Demo) -> None:
    run_id = demo.ids["scheduled"]
    with client(demo) as c:
        token = csrf(c, f"/runs/{run_id}")
        assert "Cancel run" not in c.get(f"/runs/{run_id}").text
        assert "log in to act" in c.get(f"/runs/{run_id}").text
        r = c.post(f"/runs/{run_id}/cancel", data={"csrf": token})
        assert r.status_code == 403
        wrong = c.post("/login", data={"csrf": token, "token": "not-the-token"})
        assert wrong.status_code == 403
        assert c.post(f"/runs/{run_id}/cancel", data={"csrf": token}).status_code == 403
        assert c.post("/pools/emails/cap",
                      data={"csrf": token, "max_parallelism": "9"}).status_code == 403
        assert c.post(f"/workflows/{demo.ids['waiting_workflow']}/cancel",
                      data={"csrf": token}).status_code == 403
        assert c.post(f"/workflows/{demo.ids['done_workflow']}/restart",
                      data={"csrf": token, "step": "email"}).status_code == 403
    assert state_of(demo, run_id) == ("pending", None)
    # Without a token or authorize(), nobody may act: no login either.
    with client(demo, token=None) as c:
        token = csrf(c)
        assert c.get("/login").status_code == 404
        assert c.post(f"/runs/{run_id}/cancel", data={"csrf": token}).status_code == 403
    assert state_of(demo, run_id) == ("pending", None)


def test_a_bearer_token_acts_too(demo: Demo) -> None:
    run_id = demo.ids["scheduled"]
    with client(demo) as c:
        token = csrf(c)
        bad = c.post(f"/runs/{run_id}/cancel", data={"csrf": token},
                     headers={"Authorization": "Bearer nope-nope-nope"})
        assert bad.status_code == 403
        ok = c.post(f"/runs/{run_id}/cancel", data={"csrf": token},
                    headers={"Authorization": f"Bearer {TOKEN}"}, follow_redirects=False)
        assert ok.status_code == 303
    assert state_of(demo, run_id) == ("completed", "canceled")


def test_csrf_is_checked_on_every_post(demo: Demo) -> None:
    run_id = demo.ids["scheduled"]
    with client(demo) as c:
        token = log_in(c)
        assert c.post(f"/runs/{run_id}/cancel", data={}).status_code == 403
        assert c.post(f"/runs/{run_id}/cancel", data={"csrf": "x" * 43}).status_code == 403
        c.cookies.delete("tiers_csrf")
        assert c.post(f"/runs/{run_id}/cancel", data={"csrf": token}).status_code == 403
        assert c.post("/logout", data={"csrf": token}).status_code == 403
        page = c.get("/runs").text  # a new CSRF cookie, as any page sets one
        assert re.search(r'name="csrf" value="[^"]{32,}"', page)
    assert state_of(demo, run_id) == ("pending", None)
    with client(demo) as c:  # logging in needs it too
        csrf(c, "/login")
        r = c.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 403 and "tiers_session" not in c.cookies


def test_read_only_hides_and_refuses_actions(demo: Demo) -> None:
    ids = demo.ids
    with client(demo, read_only=True) as c:
        token = csrf(c)
        for page in (f"/runs/{ids['scheduled']}", f"/runs/{ids['failed']}", "/pools/emails",
                     f"/workflows/{ids['waiting_workflow']}", f"/workflows/{ids['done_workflow']}",
                     "/workflows"):
            html = c.get(page).text
            assert 'method="post"' not in html, page
            assert "read-only" in html
        for path, data in [
            (f"/runs/{ids['scheduled']}/cancel", {}),
            (f"/runs/{ids['failed']}/retry", {}),
            ("/pools/emails/cap", {"max_parallelism": "4"}),
            ("/pools/emails/pause", {}),
            (f"/workflows/{ids['waiting_workflow']}/cancel", {}),
            (f"/workflows/{ids['done_workflow']}/restart", {"step": "email"}),
            ("/workflows/events", {"name": "approved", "data": "{}"}),
        ]:
            r = c.post(path, data={"csrf": token, **data},
                       headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 403, path
        assert c.get("/login").status_code == 404
    assert state_of(demo, ids["scheduled"]) == ("pending", None)
    assert demo.retrier.store.get_queue("emails").max_parallelism == 0  # type: ignore[union-attr]


def test_the_database_password_is_never_shown(demo: Demo, db_url: str) -> None:
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        secret = "pw-hunter2-do-not-show"
        with_password = url.set(password=secret).render_as_string(hide_password=False)
        app = create_app(with_password, token=TOKEN)  # trust auth ignores the password
    else:
        secret = db_url  # no password in a SQLite URL: the masked form shows its path
        app = create_app(db_url, token=TOKEN)
    ids = demo.ids
    with TestClient(app) as c:
        pages = ["/", "/runs", f"/runs/{ids['failed']}", "/workers", "/pools", "/pools/emails",
                 "/workflows", f"/workflows/{ids['waiting_workflow']}", "/login",
                 "/runs/nope", "/pools/nope"]
        for page in pages:
            text = c.get(page).text
            if url.get_backend_name() == "postgresql":
                assert secret not in text, page
                assert "***" in text  # the masked URL, in the header
            else:
                assert make_url(db_url).database in text  # SQLite: its file, shown


def test_mounted_with_authorize(demo: Demo) -> None:
    def is_admin(request: Request) -> bool:
        return request.headers.get("x-role") == "admin"

    outer = Starlette(routes=[Mount("/tiers", create_app(demo.retrier, authorize=is_admin))])
    run_id = demo.ids["scheduled"]
    with TestClient(outer) as c:
        page = c.get(f"/tiers/runs/{run_id}").text
        assert 'href="/tiers/runs"' in page and 'src="/tiers/static/live.js"' in page
        assert "Cancel run" not in page and "log in" not in page
        token = c.cookies.get("tiers_csrf")
        assert token and "Cancel run" in c.get(f"/tiers/runs/{run_id}",
                                                headers={"x-role": "admin"}).text
        assert c.post(f"/tiers/runs/{run_id}/cancel", data={"csrf": token}).status_code == 403
        r = c.post(f"/tiers/runs/{run_id}/cancel", data={"csrf": token},
                   headers={"x-role": "admin"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/tiers/runs/{run_id}"
    assert state_of(demo, run_id) == ("completed", "canceled")


def test_token_and_authorize_exclude_each_other(demo: Demo) -> None:
    with pytest.raises(ValueError, match="not both"):
        create_app(demo.retrier, token=TOKEN, authorize=lambda request: True)
    with pytest.raises(ValueError, match="at least 8"):
        create_app(demo.retrier, token="short")


def test_schedules_page_pause_resume_and_trigger(demo: Demo) -> None:
    retrier = demo.retrier
    retrier.schedule("nightly-charge", "charge_card", {"order_id": "n", "amount": 1},
                     cron="0 3 * * *", timezone="Europe/Paris")
    demo.pool.schedule("digest", "send_email", {"to": "a@b.c", "subject": "d"}, cron="@hourly")
    with client(demo) as c:
        page = c.get("/schedules").text
        assert "nightly-charge" in page and "Europe/Paris" in page and "in pool emails" in page
        assert "Schedules (2)" in page
        token = log_in(c)
        assert "schedule digest paused" in c.post("/schedules/digest/pause",
                                                  data={"csrf": token}).text
        assert retrier.get_schedule("digest").paused
        assert "Resume" in c.get("/schedules").text
        c.post("/schedules/digest/resume", data={"csrf": token})
        assert not retrier.get_schedule("digest").paused
        triggered = c.post("/schedules/nightly-charge/trigger", data={"csrf": token}).text
        assert "nightly-charge: run" in triggered
        missing = c.post("/schedules/nope/pause", data={"csrf": token}).text
        assert "no schedule named" in missing
        forged = c.post("/schedules/digest/pause", data={"csrf": "forged"})
        assert forged.status_code == 403 and not retrier.get_schedule("digest").paused
    with client(demo, read_only=True) as c:
        assert "Run now" not in c.get("/schedules").text
        assert c.post("/schedules/digest/pause", data={}).status_code == 403


def test_the_pool_page_shows_its_order_and_key_limits(demo: Demo) -> None:
    from workpool import Workpool

    Workpool(demo.retrier, "tenants", max_parallelism=8, round_robin_keys=True)
    store = demo.retrier.store
    store.set_key_limit("tenants", "tenant-42", 5)
    store.set_key_limit("tenants", "tenant-13", 0)
    with client(demo) as c:
        page = c.get("/pools/tenants").text
    assert "Key limits (2)" in page and "tenant-42" in page and "paused" in page
    assert "keys take turns" in page


def test_the_pool_page_shows_its_group_and_changes_its_cap(demo: Demo) -> None:
    from workpool import PoolGroup, Workpool

    gpu = PoolGroup(demo.retrier, "gpu", max_parallelism=6)
    Workpool(demo.retrier, "train", max_parallelism=6, group=gpu, guaranteed=4)
    Workpool(demo.retrier, "infer", max_parallelism=3, group=gpu, guaranteed=2)
    store = demo.retrier.store
    with client(demo) as c:
        listed = c.get("/pools").text
        assert "gpu (guaranteed 4)" in listed
        page = c.get("/pools/train").text
        assert "Group gpu (0 of 6 running)" in page
        members = page[page.index('id="group-members"'):]
        assert re.search(r"infer</a></td><td>2</td><td>3</td><td>0</td>", members)
        token = log_in(c)
        r = c.post("/pools/train/group-cap", data={"csrf": token, "max_parallelism": "9"})
        assert "group gpu cap set to 9" in r.text
        assert store.get_group("gpu").max_parallelism == 9  # type: ignore[union-attr]
        bad = c.post("/pools/train/group-cap", data={"csrf": token, "max_parallelism": "5"})
        assert "guaranteed 6 slot" in bad.text
        assert store.get_group("gpu").max_parallelism == 9  # type: ignore[union-attr]
        alone = c.post("/pools/emails/group-cap", data={"csrf": token, "max_parallelism": "5"})
        assert "belongs to no group" in alone.text
