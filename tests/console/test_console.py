"""The web console in a real headless Chromium against a real orchestrator on TCP.

Every wait is Playwright's auto-waiting ``expect`` (a deadline, no sleeps). The
page is opened as ``/ui?refresh=200``: it polls the API every 200 ms (a user's
default is 1 s), so what the API does shows within one poll.
"""

from __future__ import annotations

import io
import re
import tarfile
import threading
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.orchestrator.conftest import TEMPLATES

from .conftest import KEYS, OTHER_SECRET, SECRET, serve, sign_in

KEY_STORAGE = "sessionStorage.getItem('ppio.console.key')"
CONSOLE = "{}/ui?refresh=200"
UPLOADED_YAML = b"""\
apiVersion: v1
kind: Agent
metadata:
  name: uploaded
  version: "2.0.0"
spec:
  entrypoint: agent.py
"""


def test_sign_in_see_a_session_appear_pause_and_close_it(page: Page, tmp_path: Path) -> None:
    with serve(tmp_path, api_keys=KEYS) as orch, orch.client(SECRET) as api:
        page.goto(orch.url + "/")  # a browser asking for / is sent to the console
        expect(page).to_have_url(orch.url + "/ui")
        expect(page.locator("#login")).to_be_visible()
        page.goto(CONSOLE.format(orch.url))
        sign_in(page, SECRET)
        expect(page.locator("#who")).to_have_text("tenant acme")
        expect(page.locator("#session-count")).to_have_text("0 sessions")
        assert page.evaluate(KEY_STORAGE) == SECRET

        # A session created through the API while the page is open shows up.
        created = api.post("/v1/sessions", json={"template_id": "echo", "metadata": {"team": "qa"}})
        sid = created.json()["session_id"]
        row = page.locator(f'#sessions tr[data-session-id="{sid}"]')
        expect(row.locator(".state")).to_have_text("ready")
        expect(row).to_contain_text("echo 1.0.0")
        expect(row).to_contain_text("team=qa")
        expect(row).to_contain_text(re.compile(r"in (15m 0s|14m 5\ds)"))  # the default 900 s

        # Pause it: a confirmation first.
        row.locator('button[data-action="pause"]').click()
        expect(page.locator("#confirm")).to_be_visible()
        expect(page.locator("#confirm-text")).to_contain_text(sid)
        page.locator("#confirm-ok").click()
        expect(page.locator("#confirm")).to_be_hidden()
        expect(row.locator(".state")).to_have_text("paused")
        assert api.get(f"/v1/sessions/{sid}").json()["status"] == "paused"
        expect(row.locator('button[data-action="resume"]')).to_have_text("Resume")

        # Set its idle timeout.
        row.locator('button[data-action="timeout"]').click()
        page.locator("#confirm-timeout").fill("120")
        page.locator("#confirm-ok").click()
        expect(row).to_contain_text(re.compile(r"in (2m 0s|1m 5\ds)"))
        assert api.get(f"/v1/sessions/{sid}").json()["timeout_seconds"] == 120

        # Close it: cancelling the confirmation does nothing; confirming closes it.
        row.locator('button[data-action="close"]').click()
        page.locator("#confirm-cancel").click()
        expect(page.locator("#confirm")).to_be_hidden()
        assert api.get(f"/v1/sessions/{sid}").status_code == 200
        row.locator('button[data-action="close"]').click()
        expect(page.locator("#confirm-ok")).to_have_text("Close session")
        page.locator("#confirm-ok").click()
        expect(row).to_have_count(0)
        assert api.get(f"/v1/sessions/{sid}").status_code == 404
        expect(page.locator("#error")).to_be_hidden()

        # Signing out forgets the key and everything shown.
        page.locator("#logout").click()
        expect(page.locator("#login")).to_be_visible()
        assert page.evaluate(KEY_STORAGE) is None
        assert page.locator("#sessions tbody tr").count() == 0


def test_a_wrong_key_sees_nothing(page: Page, tmp_path: Path) -> None:
    with serve(tmp_path, api_keys=KEYS) as orch, orch.client(SECRET) as api:
        sid = api.post("/v1/sessions", json={"template_id": "echo"}).json()["session_id"]
        page.goto(CONSOLE.format(orch.url))
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#console")).to_be_hidden()

        sign_in(page, "not-a-key-of-this-orchestrator")
        expect(page.locator("#login-error")).to_contain_text("not accepted")
        expect(page.locator("#login-error")).to_contain_text("AuthenticationError")
        expect(page.locator("#console")).to_be_hidden()
        assert page.evaluate(KEY_STORAGE) is None
        assert sid not in page.content()
        assert page.locator("#sessions tbody tr").count() == 0

        # Another tenant's key signs in but sees none of acme's sessions.
        sign_in(page, OTHER_SECRET)
        expect(page.locator("#who")).to_have_text("tenant zenith")
        expect(page.locator("#session-count")).to_have_text("0 sessions")
        assert sid not in page.content()

        # A key that stops working (here: swapped for a wrong one) sends the page back.
        page.evaluate("sessionStorage.setItem('ppio.console.key', 'no-longer-valid')")
        page.reload()
        expect(page.locator("#login-error")).to_contain_text("no longer accepted")
        expect(page.locator("#console")).to_be_hidden()
        assert sid not in page.content()


def test_turns_appear_live_and_the_charts_follow(page: Page, tmp_path: Path) -> None:
    with serve(tmp_path, api_keys=KEYS) as orch, orch.client(SECRET) as api:
        sid = api.post("/v1/sessions", json={"template_id": "echo"}).json()["session_id"]
        page.goto(CONSOLE.format(orch.url))
        sign_in(page, SECRET)
        page.locator(f'#sessions tr[data-session-id="{sid}"]').click()
        expect(page.locator("#detail")).to_be_visible()
        expect(page.locator("#detail-id")).to_have_text(sid)
        expect(page.locator("#turns-empty")).to_be_visible()

        def invoke(body: dict[str, object], request_id: str, **headers: str) -> None:
            api.post(
                f"/v1/sessions/{sid}/invocations",
                json=body,
                headers={"X-PPIO-Request-Id": request_id, **headers},
            )

        invoke({"prompt": "hello console"}, "req-one", **{"X-PPIO-Strategy": "reject"})
        first = page.locator('#turns tr[data-request-id="req-one"]')
        expect(first).to_contain_text("reject")
        expect(first.locator(".state")).to_have_text("ok")
        expect(first).to_contain_text('"echo":"hello console"')

        # New turns appear at the top while the page is open, marked new.
        invoke({"action": "fail"}, "req-two")
        second = page.locator('#turns tr[data-request-id="req-two"]')
        expect(second.locator(".state")).to_have_text("error")
        expect(second).to_contain_text("enqueue")
        expect(second).to_have_class("new")
        newest = page.locator("#turns tbody tr").first
        expect(newest).to_have_attribute("data-request-id", "req-two")

        # A turn still running: at the top, and its session busy, not idle.
        def slow_turn() -> None:
            with orch.client(SECRET) as own:
                body = {"action": "sleep", "seconds": 1.0}
                headers = {"X-PPIO-Request-Id": "req-slow"}
                own.post(f"/v1/sessions/{sid}/invocations", json=body, headers=headers)

        slow = threading.Thread(target=slow_turn)
        slow.start()
        running = page.locator('#turns tr[data-request-id="req-slow"]')
        expect(running.locator(".state")).to_have_text("running")
        expect(running).to_contain_text("running…")
        session_row = page.locator(f'#sessions tr[data-session-id="{sid}"]')
        expect(session_row.locator(".state")).to_have_text("busy")
        expect(session_row).to_contain_text("not idle")
        slow.join()
        expect(running.locator(".state")).to_have_text("ok")
        expect(session_row.locator(".state")).to_have_text("ready")

        # The charts' figures come from the same counters as /metrics.
        expect(page.locator("#legend-turns")).to_contain_text("3 total")
        expect(page.locator("#legend-latency")).to_contain_text("mean")
        expect(page.locator("#legend-sessions")).to_contain_text("active 1")
        expect(page.locator("#legend-sandboxes")).to_contain_text("1 started")
        drawn = page.evaluate(
            """() => [...document.querySelectorAll('.chart canvas')].map((c) => {
                const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let inked = 0;
                for (let i = 3; i < px.length; i += 4) if (px[i]) inked++;
                return inked;
            })"""
        )
        assert len(drawn) == 4
        assert all(drawn), drawn  # every chart drew something

        # Closed elsewhere: the details say it ended.
        api.delete(f"/v1/sessions/{sid}")
        expect(page.locator("#detail-note")).to_contain_text("ended")


def test_without_keys_no_sign_in_and_every_view_works(page: Page, tmp_path: Path) -> None:
    # On trio too: the API is QuartTrio there, and the files come from the same front door.
    with serve(tmp_path, backend="trio") as orch, orch.client() as api:
        page.goto(CONSOLE.format(orch.url))
        expect(page.locator("#notice")).to_contain_text("Authentication is off")
        expect(page.locator("#notice")).to_contain_text("loopback only")
        expect(page.locator("#who")).to_have_text("authentication off")
        expect(page.locator("#login")).to_be_hidden()
        expect(page.locator("#logout")).to_be_hidden()

        ids = {}
        for team in ("alpha", "beta"):
            body = {"template_id": "echo", "metadata": {"team": team}}
            created = api.post("/v1/sessions", json=body)
            ids[team] = created.json()["session_id"]
        rows = page.locator("#sessions tbody tr")
        expect(page.locator("#session-count")).to_have_text("2 sessions")
        api.post(f"/v1/sessions/{ids['beta']}/pause")

        # Search and filter.
        page.locator("#search").fill("beta")
        expect(page.locator("#session-count")).to_have_text("1 of 2 sessions")
        expect(rows.filter(visible=True)).to_have_count(1)
        expect(page.locator(f'tr[data-session-id="{ids["beta"]}"]')).to_be_visible()
        page.locator("#search").fill("")
        page.locator("#state-filter").select_option("paused")
        expect(page.locator("#session-count")).to_have_text("1 of 2 sessions")
        expect(page.locator(f'tr[data-session-id="{ids["alpha"]}"]')).to_be_hidden()
        page.locator("#state-filter").select_option("ready")
        expect(page.locator(f'tr[data-session-id="{ids["alpha"]}"]')).to_be_visible()
        expect(page.locator(f'tr[data-session-id="{ids["beta"]}"]')).to_be_hidden()

        # Templates: phase, id, sandbox kind, build log.
        page.locator('#nav .tab[data-view="templates"]').click()
        echo = page.locator("#templates tbody tr").filter(has_text="echo")
        expect(echo.locator(".state")).to_have_text("deployed")
        expect(echo).to_contain_text("inprocess")
        expect(echo).to_contain_text("1.0.0")

        # Deploy an upload from the page: its phase follows live, up to deployed.
        archive = tmp_path / "uploaded.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(TEMPLATES / "echo" / "agent.py", arcname="agent.py")
            info = tarfile.TarInfo(".ppio-agent.yaml")
            info.size = len(UPLOADED_YAML)
            tar.addfile(info, io.BytesIO(UPLOADED_YAML))
        page.locator("#deploy-file").set_input_files(archive)
        page.locator("#deploy-submit").click()
        expect(page.locator("#deploy-status")).to_contain_text("uploaded 2.0.0")
        uploaded = page.locator("#templates tbody tr").filter(has_text="uploaded")
        expect(uploaded.locator(".state")).to_have_text("deployed")
        expect(uploaded).to_contain_text("process")  # an upload runs walled off, by default

        # Cluster: a single node shows just itself, with its load.
        page.locator('#nav .tab[data-view="cluster"]').click()
        expect(page.locator("#cluster-summary")).to_contain_text("single node")
        node = page.locator("#members tbody tr")
        expect(node).to_have_count(1)
        expect(node.locator(".state")).to_have_text("alive")
        expect(node.locator("td").nth(4)).to_have_text("2")
