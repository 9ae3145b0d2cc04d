"""Make docs/console.png: the console's sessions view, with a few sessions and live charts.

    .venv/bin/python -m tests.console.screenshot docs/console.png

Serves an orchestrator on loopback (two test templates: in-process and
process sandboxes), signs in with Chromium, and runs a bounded load for
``--seconds`` (turns of varied length, a few failures, a sandbox crash and
new sessions now and then) so the charts have a history, then takes the
picture. Not a test: pytest collects only ``test_*.py``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from .conftest import CHROMIUM, CHROMIUM_ARGS, KEYS, SECRET, serve, sign_in

USERS = ("ana", "bo", "chen", "dara", "eli", "fatou", "gus", "hana")


def load(api: httpx.Client, sessions: list[str], until: float, rng: random.Random) -> None:
    """Turns at a few per second, for as long as the picture needs a history."""
    n = 0
    while time.monotonic() < until:
        n += 1
        sid = rng.choice(sessions)
        roll = rng.random()
        if roll < 0.08:
            body: dict[str, object] = {"action": "fail"}
        elif roll < 0.2:
            body = {"action": "stream", "count": rng.randint(2, 6), "delay": 0.01}
        else:
            body = {"action": "sleep", "seconds": round(rng.uniform(0.005, 0.12), 3)}
        strategy = "reject" if roll > 0.9 else "enqueue"
        api.post(
            f"/v1/sessions/{sid}/invocations",
            json=body,
            headers={"X-PPIO-Strategy": strategy, "X-PPIO-Request-Id": f"req-{n:05d}"},
        )
        time.sleep(rng.uniform(0.05, 0.35) * (2 if n % 50 < 15 else 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    rng = random.Random(12)
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve(Path(tmp), api_keys=KEYS, templates=("echo", "echo_process")) as orch,
        orch.client(SECRET) as api,
        sync_playwright() as playwright,
    ):

        def create(template: str, user: str) -> str:
            body = {"template_id": template, "metadata": {"user": user}}
            reply = api.post("/v1/sessions", json=body)
            reply.raise_for_status()
            return str(reply.json()["session_id"])

        sessions = [create("echo", user) for user in USERS[:3]]
        process = create("echo-process", USERS[3])
        quiet = create("echo", USERS[7])  # paused, and left out of the load (its turns would wait)
        api.post(f"/v1/sessions/{quiet}/pause").raise_for_status()
        context = playwright.chromium.launch_persistent_context(
            Path(tmp) / "profile",
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1080},
            device_scale_factor=1,
        )
        page = context.new_page()
        page.goto(f"{orch.url}/ui?refresh=500")
        sign_in(page, SECRET)
        page.locator(f'tr[data-session-id="{sessions[0]}"]').wait_for()
        until = time.monotonic() + args.seconds
        workers = [
            threading.Thread(target=load, args=(orch.client(SECRET), sessions, until, rng))
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        # Now and then a new session, and a crash in the process sandbox (restarted).
        for step, user in enumerate(USERS[4:7]):
            time.sleep(args.seconds / 4)
            sessions.append(create("echo", user))
            if step == 0:
                api.post(f"/v1/sessions/{process}/invocations", json={"action": "crash"})
                api.post(f"/v1/sessions/{process}/invocations", json={"prompt": "again"})
        # The picture while the load still runs: the legends show live figures.
        page.locator(f'tr[data-session-id="{sessions[0]}"]').click()
        page.locator("#turns tbody tr").first.wait_for()
        page.wait_for_timeout(1500)  # three more polls
        args.output.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.output))
        for worker in workers:
            worker.join()
        context.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
