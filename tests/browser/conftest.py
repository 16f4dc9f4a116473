"""Browser tests of the LeadBoard page: Debian's Chromium driven by Playwright (never a downloaded browser
build), against the real API served by uvicorn over the real Redis, ClickHouse and Kafka of the local stack.

The stack fixtures come from tests/integration/conftest.py: each test gets its own topic prefix, Redis key
prefix and ClickHouse database. The page may only talk to the API's origin: any other request fails the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from schemas.settings import Settings
from tests.browser.board_seed import API_KEYS, KEY, PIPELINE, SITE, BoardSeeder, serve_api
from tests.integration.conftest import roles, settings, stack_settings  # noqa: F401 - the stack fixtures

CHROMIUM = "/usr/bin/chromium"  # Debian's package: `apt-get install -y chromium`


@dataclass
class Dashboard:
    base_url: str
    settings: Settings
    seeder: BoardSeeder
    http: httpx.Client  # the API with the site's read-write key

    def url(self, key: str = KEY) -> str:
        return f"{self.base_url}/board#site={SITE}&key={key}"


@pytest.fixture
def dashboard(settings, monkeypatch) -> Iterator[Dashboard]:  # noqa: F811 - `settings` is the stack fixture
    """The API serving the page, with the pipeline board defined. Commands wait only briefly for the board
    processor (not running here), so a POST answers 202 quickly."""
    monkeypatch.setattr("api.commands.COMMAND_WAIT_S", 0.5)
    seeder = BoardSeeder(settings)
    with serve_api(replace(settings, api_keys=API_KEYS)) as base_url, \
            httpx.Client(base_url=base_url, headers={"X-API-Key": KEY}, timeout=10) as http:
        assert http.put(f"/v1/sites/{SITE}/boards/{PIPELINE.id}",
                        json=PIPELINE.model_dump(mode="json", exclude_unset=True)).status_code == 200
        yield Dashboard(base_url, settings, seeder, http)
    seeder.close()


@pytest.fixture
def browser(dashboard: Dashboard) -> Iterator[Browser]:
    """Started after the stack fixtures, per test: Playwright's sync API keeps an event loop running in this
    thread, and the `settings` fixture runs its own (asyncio.run) to create the test's topics."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, dashboard: Dashboard) -> Iterator[Page]:
    """A fresh page whose requests may only go to the API's origin."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    origin = urlsplit(dashboard.base_url).netloc
    foreign: list[str] = []

    def only_same_origin(route):
        if urlsplit(route.request.url).netloc == origin:
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    page.route("**/*", only_same_origin)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    refused: list[str] = []  # what the API's Content-Security-Policy blocked: the pages must need nothing it forbids
    page.on("console", lambda message: refused.append(message.text)
            if "Content Security Policy" in message.text else None)
    yield page
    context.close()
    assert foreign == [], f"the page made external requests: {foreign}"
    assert errors == [], f"uncaught script errors: {errors}"
    assert refused == [], f"blocked by the Content-Security-Policy: {refused}"
