"""The LeadBoard page's segments view in a real browser: the Segments tab lists the site's segments with
their member counts; a segment's members, sorted by score or last seen and paged; a member opens its card's
panel when the board shows the card, else its Lead Profile or its account's leads, read-only; the CSV
download. Membership is seeded in ClickHouse as the sink writes it (tests/segment_seed.py)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from sinks.clickhouse import connect, insert_columnar
from tests.browser.board_seed import READ_ONLY_KEY, SITE
from tests.segment_seed import PRICING_BY_LAST_SEEN, PRICING_BY_SCORE, SEGMENTS, seed_many, seed_members

pytestmark = pytest.mark.integration

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "segments.png"


@pytest.fixture
def segments(dashboard):
    """The seeded segments defined through the API, with their members in ClickHouse; Acme has a card."""
    client = connect(dashboard.settings.clickhouse())
    seed_members(lambda table, columns, rows: insert_columnar(client, table, columns, rows))
    for segment in SEGMENTS:
        body = {key: value for key, value in segment.items() if key != "id"}
        assert dashboard.http.put(f"/v1/sites/{SITE}/segments/{segment['id']}", json=body).status_code == 200
    dashboard.seeder.show(("account:acme.com", "Acme", ("Consideration",), 40))
    return client


def open_segments(page: Page, dashboard, key: str | None = None) -> None:
    page.goto(dashboard.url(key) if key else dashboard.url())
    expect(page.locator(".card")).to_have_count(1)  # the board is loaded
    page.get_by_role("tab", name="Segments").click()
    expect(page.locator("#segments-view")).to_be_visible()


def segment_button(page: Page, segment_id: str):
    return page.locator(f'#segment-list button[data-segment="{segment_id}"]')


def member_ids(page: Page):
    return page.locator("#members-table tbody tr")


def test_segments_show_their_counts_and_members_sorted_both_ways(page, dashboard, segments):
    open_segments(page, dashboard)
    expect(page.locator("#board")).to_be_hidden()
    expect(page.locator("#segment-list .name")).to_have_text(
        ["Companies with a known contact", "Score 10+", "Viewed pricing twice in 14 days"])
    expect(page.locator("#segment-list .count")).to_have_text(["2", "3", "3"])
    expect(page.locator("#segment-list .detail")).to_have_text(["accounts", "leads", "leads"])
    # the first segment opens by itself: an account segment
    expect(page.locator("#members-title")).to_have_text("Companies with a known contact")
    expect(page.locator("#members-table tbody tr td:first-child")).to_have_text(["Acme Corporation", "Globex"])
    expect(page.locator("#members-count")).to_have_text("2 accounts")

    segment_button(page, "pricing-viewers").click()
    expect(segment_button(page, "pricing-viewers")).to_have_attribute("aria-pressed", "true")
    rows = member_ids(page)
    expect(rows).to_have_count(3)
    assert [rows.nth(i).get_attribute("data-member") for i in range(3)] == PRICING_BY_SCORE
    ann = page.locator('tr[data-member="lead-ann"] td')
    expect(ann).to_have_text(["ann@acme.com", "acme.com", "40", "Consideration", "5h ago", "referral → email"])
    expect(page.locator('tr[data-member="lead-anon"] td').first).to_have_text("Anonymous lead d-anon")
    expect(page.locator('tr[data-member="lead-anon"] .tag')).to_have_text("=SUM(A1)")  # text, never markup
    expect(page.locator('th[aria-sort="descending"]')).to_have_text("Score")

    page.get_by_role("button", name="Last seen").click()
    expect(page.locator('th[aria-sort="descending"]')).to_have_text("Last seen")
    expect(rows.first).to_have_attribute("data-member", PRICING_BY_LAST_SEEN[0])
    assert [rows.nth(i).get_attribute("data-member") for i in range(3)] == PRICING_BY_LAST_SEEN
    page.set_viewport_size({"width": 1200, "height": 420})
    page.screenshot(path=str(SCREENSHOT))

    page.get_by_role("tab", name="Board").click()
    expect(page.locator("#board")).to_be_visible()
    expect(page.locator("#segments-view")).to_be_hidden()


def test_a_long_list_pages_on_with_more(page, dashboard, segments):
    everyone = seed_many(lambda table, columns, rows: insert_columnar(segments, table, columns, rows), "everyone", 120)
    assert dashboard.http.put(f"/v1/sites/{SITE}/segments/everyone", json={"name": "Everyone"}).status_code == 200
    open_segments(page, dashboard)
    segment_button(page, "everyone").click()
    rows = member_ids(page)
    expect(rows).to_have_count(50)
    expect(page.locator("#members-count")).to_have_text("120 leads · 50 shown")
    page.get_by_role("button", name="More members").click()
    expect(rows).to_have_count(100)
    page.get_by_role("button", name="More members").click()
    expect(rows).to_have_count(120)
    expect(page.get_by_role("button", name="More members")).to_be_hidden()
    expect(page.locator("#members-count")).to_have_text("120 leads")
    shown = page.locator("#members-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.member)")
    assert shown == everyone  # each once, in the list's order across pages


def test_a_member_opens_its_card_or_its_profile(page, dashboard, segments):
    open_segments(page, dashboard)
    page.get_by_role("button", name="Acme Corporation").click()  # an account with a card on this board
    panel = page.locator("#panel")
    expect(panel).to_be_visible()
    expect(page.locator("#panel-title")).to_have_text("Acme")
    expect(panel.get_by_role("button", name="Move")).to_be_visible()  # the card's own panel, with its actions
    panel.get_by_role("button", name="Close").click()

    page.get_by_role("button", name="Globex").click()  # an account without a card: its leads, read-only
    expect(page.locator("#panel-title")).to_have_text("Globex")
    expect(panel.locator(".read-only")).to_be_visible()
    expect(page.locator("#status")).not_to_have_class("error")
    panel.get_by_role("button", name="bob@globex.com").click()
    expect(page.locator("#panel-title")).to_have_text("bob@globex.com")

    segment_button(page, "pricing-viewers").click()
    page.get_by_role("button", name="ann@acme.com").click()  # a lead of an account: its Lead Profile
    expect(page.locator("#panel-title")).to_have_text("ann@acme.com")
    expect(panel.locator("dt:text-is('Score') + dd")).to_have_text("40")
    expect(panel.locator(".session")).to_have_count(3)  # newest first
    expect(panel.locator(".session .head").last).to_contain_text("referral")
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()


def test_members_download_as_csv(page, dashboard, segments):
    open_segments(page, dashboard)
    segment_button(page, "pricing-viewers").click()
    expect(member_ids(page)).to_have_count(3)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    assert download.value.suggested_filename == "segment-pricing-viewers.csv"
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    assert [row[0] for row in rows] == ["lead_id", *PRICING_BY_SCORE]


def test_a_read_only_key_sees_the_segments(page, dashboard, segments):
    open_segments(page, dashboard, READ_ONLY_KEY)
    expect(page.locator("#segment-list .count")).to_have_text(["2", "3", "3"])
