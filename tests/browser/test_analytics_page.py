"""The analytics page at `/` in a real browser: it takes the site and key from the URL fragment (which never
reaches the server), sends the key only as the X-API-Key header, and drops it from the address bar; an old
`/?site=…&key=…` link opens nothing."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.board_seed import KEY, SITE, seed_account_click_stream

pytestmark = pytest.mark.integration


def test_the_key_comes_from_the_fragment_and_travels_only_in_a_header(page, dashboard):
    seed_account_click_stream(dashboard.settings)
    api_requests = []
    page.on("request", lambda request: api_requests.append(request) if "/v1/" in request.url else None)

    page.goto(f"{dashboard.base_url}/?site={SITE}&key={KEY}")  # the old form of the link
    expect(page.locator("#site .err")).to_have_text("open this page as /#site=SITE&key=KEY")
    assert api_requests == []

    page.goto(f"{dashboard.base_url}/#site={SITE}&key={KEY}")
    expect(page.locator("#site")).to_have_text(f"site {SITE}")
    expect(page.locator("#leads a")).to_have_text(["ann@acme.com", "Anonymous lead d-anon"])  # both are leads
    expect(page.locator("#summary .card h2").first).to_be_visible()
    assert KEY not in page.url
    assert api_requests and all(KEY not in r.url and r.headers["x-api-key"] == KEY for r in api_requests)
    page.locator("#leads a").first.click()
    expect(page.locator("#profile")).to_contain_text('"email": "ann@acme.com"')


def test_hostile_values_render_as_text(page, dashboard):
    domain = '<img src=x onerror="window.pwned=1">.com'
    seed_account_click_stream(dashboard.settings, domain=domain)
    page.goto(f"{dashboard.base_url}/#site={SITE}&key={KEY}")
    expect(page.locator("#leads a")).to_have_text([f"ann@{domain}", "Anonymous lead d-anon"])
    expect(page.locator("#summary").get_by_text(domain, exact=True)).to_be_visible()  # top accounts
    assert page.locator("#leads img, #summary img").count() == 0
    assert page.evaluate("window.pwned") is None
