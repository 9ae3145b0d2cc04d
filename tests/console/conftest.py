"""The console's tests: a real orchestrator on a loopback TCP port, a real headless Chromium.

The orchestrator runs in a thread of its own (an anyio blocking portal, on
asyncio or trio), so the test drives the browser with Playwright's sync API
and calls the API with a plain httpx client. Its port is bound before it
starts (the socket is handed over as ``listen_fd``): no race for a free port.

The browser is Debian's ``chromium`` (``make test`` installs it: see
``DEBIAN_PACKAGES`` in the Makefile), launched by Playwright with a fresh
profile directory; Playwright's own browser download is never used.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from ppio_sandbox.orchestrator.host import Orchestrator
from ppio_sandbox.orchestrator.server import ServeOptions, run
from tests.orchestrator.conftest import template_dir

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 8_000
"""How long a browser expectation waits for its condition (the page polls every second)."""

TENANT = "acme"
SECRET = "console-secret-acme-1"
OTHER_SECRET = "console-secret-zenith-1"
KEYS = [f"{TENANT}:k-acme:{SECRET}", f"zenith:k-zenith:{OTHER_SECRET}"]

expect.set_options(timeout=WAIT_MS)


@dataclass
class Served:
    """An orchestrator serving on ``url`` from another thread."""

    url: str
    host: Orchestrator
    portal: BlockingPortal

    def client(self, secret: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=20)


@contextmanager
def serve(
    tmp_path: Path,
    *,
    api_keys: list[str] | None = None,
    backend: str = "asyncio",
    templates: tuple[str, ...] = ("echo",),
    **options: Any,
) -> Iterator[Served]:
    """Serve an orchestrator on a free 127.0.0.1 port until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    opts = ServeOptions(
        host="127.0.0.1",
        port=port,
        listen_fd=sock.detach(),  # hypercorn takes it over (and closes it)
        data_dir=tmp_path / "data",
        templates=[template_dir(name, tmp_path) for name in templates],
        api_keys=list(api_keys or []),
        environ={},
        # Also hypercorn's graceful timeout, which on trio waits for the browser's idle
        # keep-alive connections to close: short, since no test stops mid-turn.
        grace=0.5,
        **options,
    )
    with start_blocking_portal(backend) as portal:
        shutdown: anyio.Event = portal.call(anyio.Event)
        future, host = portal.start_task(
            functools.partial(run, opts, shutdown=shutdown, install_signal_handlers=False)
        )
        try:
            yield Served(f"http://127.0.0.1:{port}", host, portal)
        finally:
            portal.call(shutdown.set)
            future.result(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Headless Chromium with a fresh profile, shared by one module's tests.

    Module-scoped, and only for sync tests: while Playwright's sync API is open it
    holds an asyncio loop running in this thread, so an async test (anyio) cannot
    run beside it; pytest closes it before the next module's tests.
    """
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `make system-deps` (Debian package chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    """A new tab (its own sessionStorage), whose JS errors fail the test."""
    tab = browser.new_page()
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        tab.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page: Page, secret: str) -> None:
    page.locator("#key").fill(secret)
    page.locator("#login-submit").click()
