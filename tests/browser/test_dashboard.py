"""The LeadBoard page in a real browser: columns, cards and counts; live updates over the stream without a
reload; drag to move (the command reaches Kafka; without the board processor running the API answers 202, and
the test applies the command as the board processor does); a refused backward move shown and forced with a reason;
the Account Panel (company, location, networks, lead time, its leads with their channel, sessions, events, score
and tags; a lead opened with its own sessions, 5 at a time) and its "5 more sessions"; lead time per column;
adding an account by domain; the key kept out of URLs. The last test runs the real board processor
(`leadstream worker --processors board`): drag, processor, Redis, stream, page.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from leadstream.runner import Role
from tests.browser.board_seed import (
    HOUR_MS,
    KEY,
    NOW_MS,
    SITE,
    expected_partition,
    read_commands,
    seed_account_click_stream,
    seed_company_card,
)

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs"
SCREENSHOT = DOCS / "dashboard.png"
PANEL_SCREENSHOT = DOCS / "account-panel.png"
CARDS = (
    ("account:acme.com", "Acme", ("Consideration",), 40),
    ("account:hooli.com", "Hooli", ("Consideration",), 35),
    ("account:globex.com", "Globex", ("Consideration", "Decision"), 80),
    ("account:initech.com", "Initech", (), 5),
    ("account:umbrella.com", "Umbrella", (), 12),
)
MORE_CARDS = (
    ("account:wonka.com", "Wonka Industries", ("Consideration", "Decision", "Trial"), 95),
    ("account:tyrell.com", "Tyrell Corp", ("Consideration", "Enterprise"), 55),
    ("account:stark.com", "Stark Industries", ("Decision",), 72),
    ("account:soylent.com", "Soylent", (), 8),
    ("account:cyberdyne.com", "Cyberdyne Systems", ("Webinar",), 18),
)


def card(page: Page, card_id: str, stage: str | None = None):
    column = f'.column[data-stage="{stage}"] ' if stage else ""
    return page.locator(f'{column}.card[data-card="{card_id}"]')


def count(page: Page, stage: str):
    return page.locator(f'.column[data-stage="{stage}"] .count')


def open_board(page: Page, dashboard) -> None:
    dashboard.seeder.show(*CARDS)
    page.goto(dashboard.url())
    expect(page.locator("#live")).to_have_text("live")  # the stream is open: nothing after this is missed


def test_board_shows_columns_cards_and_counts(page, dashboard):
    seed_account_click_stream(dashboard.settings)
    open_board(page, dashboard)
    expect(page.locator(".column h2 span:first-child")).to_have_text(["New", "Consideration", "Decision", "Customer"])
    for stage, n in (("new", "2"), ("consideration", "2"), ("decision", "1"), ("customer", "0")):
        expect(count(page, stage)).to_have_text(n)
    globex = card(page, "account:globex.com", "decision")
    expect(globex.locator(".title")).to_have_text("Globex")
    expect(globex.locator(".tag")).to_have_text(["Consideration", "Decision"])
    expect(globex.locator(".score")).to_have_text("score 80")
    expect(globex.locator(".in-stage")).to_have_text("3h")
    assert KEY not in page.url  # the fragment with the key is gone from the address bar
    assert page.evaluate("sessionStorage.getItem('leadstream.key')") == KEY
    dashboard.seeder.show(*MORE_CARDS)  # arrive live, then one is won by hand: the picture for the docs
    dashboard.seeder.move("account:wonka.com", "customer")
    expect(count(page, "customer")).to_have_text("1")
    expect(count(page, "new")).to_have_text("4")
    page.set_viewport_size({"width": 1200, "height": 480})
    page.screenshot(path=str(SCREENSHOT))


def test_live_updates_arrive_without_a_reload(page, dashboard):
    open_board(page, dashboard)
    page.evaluate("window.notReloaded = true")
    dashboard.seeder.show(("account:initech.com", "Initech", ("Decision",), 70))  # as the board processor writes it
    expect(card(page, "account:initech.com", "decision")).to_be_visible()
    expect(card(page, "account:initech.com", "new")).to_have_count(0)
    expect(count(page, "new")).to_have_text("1")
    expect(count(page, "decision")).to_have_text("2")
    dashboard.seeder.show(("account:newco.com", "Newco", (), 1))
    expect(card(page, "account:newco.com", "new")).to_be_visible()
    expect(count(page, "new")).to_have_text("2")
    assert page.evaluate("window.notReloaded") is True


def test_drag_to_another_column_sends_the_move(page, dashboard):
    open_board(page, dashboard)
    version = dashboard.http.get(f"/v1/sites/{SITE}/boards/pipeline").json()["version"]
    page.drag_and_drop('.card[data-card="account:acme.com"]', '.column[data-stage="decision"]')
    expect(page.locator("#status")).to_contain_text("Move Acme to decision: sent")
    [(partition, command)] = read_commands(dashboard.settings, 1)
    assert (command.kind, command.card_id, command.to_stage, command.if_match) == (
        "move", "account:acme.com", "decision", version)
    assert partition == expected_partition(dashboard.settings, "account:acme.com")
    assert dashboard.seeder.command(command).ok  # what the board processor will do with it
    expect(card(page, "account:acme.com", "decision")).to_be_visible()
    expect(count(page, "consideration")).to_have_text("1")
    expect(count(page, "decision")).to_have_text("2")


def test_a_refused_backward_move_is_shown_and_can_be_forced_with_a_reason(page, dashboard):
    open_board(page, dashboard)
    page.drag_and_drop('.card[data-card="account:globex.com"]', '.column[data-stage="new"]')
    dialog = page.locator("#force-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#force-message")).to_contain_text("moving back from decision to new needs force and a reason")
    expect(page.locator("#status")).to_have_class("error")
    expect(card(page, "account:globex.com", "decision")).to_be_visible()  # not moved
    dialog.get_by_label("Reason for moving this card back").fill("budget frozen until Q3")
    dialog.get_by_role("button", name="Force move with reason").click()
    expect(page.locator("#status")).to_contain_text("Move Globex to new: sent")
    [(_, command)] = read_commands(dashboard.settings, 1)
    assert (command.to_stage, command.force, command.reason) == ("new", True, "budget frozen until Q3")


def test_the_account_panel_opens_and_pages_five_sessions_at_a_time(page, dashboard):
    seed_account_click_stream(dashboard.settings, sessions=7)
    open_board(page, dashboard)
    card(page, "account:acme.com").click()
    panel = page.get_by_role("complementary", name="Acme")
    expect(panel).to_be_visible()
    expect(panel.locator("dd").nth(1)).to_have_text("Acme Corporation")
    expect(panel.locator(".lead-list tbody tr")).to_have_count(2)
    sessions = panel.locator(".session")
    expect(sessions).to_have_count(5)
    expect(sessions.first.locator(".events .type")).to_have_text(
        ["referrer", "pageview", "pageview", "email_open", "email_click", "exit"])
    more = panel.get_by_role("button", name="5 more sessions")
    more.click()
    expect(sessions).to_have_count(7)
    expect(more).to_be_hidden()
    expect(sessions.last).to_have_attribute("data-session", "s-0")
    assert "null" not in panel.inner_text()
    panel.get_by_role("button", name="Close account panel").click()
    expect(panel).to_be_hidden()


def test_the_account_panel_shows_the_company_its_leads_and_a_leads_own_click_stream(page, dashboard):
    """Ann (known; sessions 0, 2, ... 10 from the office in Amsterdam) and an anonymous colleague (1, 3, ... 11
    from an ISP in Berlin), first seen 13 h ago; the card entered Consideration 3 h ago."""
    seed_account_click_stream(dashboard.settings, sessions=12)
    seed_company_card(dashboard.settings)
    open_board(page, dashboard)
    # Consideration: acme.com after 10 h, Hooli at once (nobody from it seen: it counts from entering the board)
    expect(page.locator('.column[data-stage="consideration"] .stage-lead-time')).to_have_text(
        "reached in 0m median · 10h p90")
    card(page, "account:acme.com").click()
    panel = page.get_by_role("complementary", name="Acme")
    details = panel.locator(".account-details")
    for name, value in (("Company", "Acme Corporation"), ("Industry", "Software"), ("Employees", "51-200"),
                        ("Country", "NL"), ("Website", "https://acme.com/"), ("Known contacts", "1"),
                        ("Anonymous leads", "1")):
        expect(details.locator(f'dt:text-is("{name}") + dd')).to_have_text(value)
    expect(details.locator(".places li")).to_have_text(["Berlin, DE · 1 visitor",  # as many events: by country
                                                        "Amsterdam, North Holland, NL · 1 visitor"])
    expect(details.locator(".networks li")).to_have_text(["Acme Corporation · business · 1 visitor",
                                                          "Deutsche Telekom AG · isp · 1 visitor"])
    expect(panel.locator(".lead-time li")).to_have_text(["Consideration 10h"])
    expect(panel.locator(".lead-time-total")).to_have_text("Not in Customer yet; first seen 13h ago.")

    rows = panel.locator(".lead-list tbody tr")
    expect(rows).to_have_count(2)
    ann, colleague = rows.nth(0), rows.nth(1)
    expect(ann.locator(".lead-open")).to_have_text("ann@acme.com")
    expect(colleague.locator(".lead-open")).to_have_text("Anonymous lead")
    for row, score, tag in ((ann, "40", "Consideration"), (colleague, "15", "Webinar")):
        expect(row.locator(".channel")).to_have_text("referral")
        expect(row.locator(".sessions-count")).to_have_text("6")
        expect(row.locator(".events-count")).to_have_text("36")
        expect(row.locator(".score")).to_have_text(score)
        expect(row.locator(".tag")).to_have_text([tag])

    ann.locator(".lead-open").click()
    profile = panel.get_by_role("region", name="Lead ann@acme.com")
    expect(profile).to_be_visible()
    expect(profile.locator('dt:text-is("Tags") + dd')).to_have_text("Consideration")
    lead_sessions = profile.locator(".session")
    expect(lead_sessions).to_have_count(5)
    assert lead_sessions.evaluate_all("nodes => nodes.map(n => n.dataset.session)") == ["s-10", "s-8", "s-6", "s-4",
                                                                                        "s-2"]
    expect(lead_sessions.first.locator(".events .type")).to_have_text(
        ["referrer", "pageview", "pageview", "email_open", "email_click", "exit"])
    expect(lead_sessions.first.locator(".events li").nth(1)).to_contain_text("https://acme.com/pricing")
    assert "null" not in panel.inner_text()
    page.set_viewport_size({"width": 1300, "height": 1500})  # the picture for the docs: a lead opened, from the top
    panel.evaluate("node => { node.scrollTop = 0; }")
    page.screenshot(path=str(PANEL_SCREENSHOT))

    more = profile.get_by_role("button", name="5 more sessions")
    more.click()
    expect(lead_sessions).to_have_count(6)
    expect(lead_sessions.last).to_have_attribute("data-session", "s-0")
    expect(more).to_be_hidden()
    ann.locator(".lead-open").click()  # folds it again
    expect(profile).to_have_count(0)
    assert "null" not in panel.inner_text()


def test_other_views_open_a_card_or_a_lead_by_id_and_empty_panels_say_so(page, dashboard):
    seed_account_click_stream(dashboard.settings, sessions=7)
    dashboard.seeder.show(("lead:lead-solo", "Solo", (), 5))
    open_board(page, dashboard)
    page.evaluate("openLead('lead-anon')")
    panel = page.locator("#panel")
    expect(page.locator("#panel-title")).to_have_text("Anonymous lead lead-anon")
    expect(panel.locator(".session")).to_have_count(3)
    expect(panel.locator('dt:text-is("Tags") + dd')).to_have_text("Webinar")
    page.evaluate("openCard('lead:lead-solo')")  # a lead card ClickHouse knows nothing of yet
    expect(page.locator("#panel-title")).to_have_text("Solo")
    expect(panel).to_contain_text("No tracked activity yet.")
    expect(panel.locator(".lead-time li")).to_have_text(["New 0m"])
    assert "null" not in panel.inner_text()
    page.evaluate("openCard('account:initech.com')")  # on the board, nobody from it seen
    expect(page.locator("#panel-title")).to_have_text("Initech")
    expect(panel).to_contain_text("Nobody from this account has been seen yet.")
    expect(panel).to_contain_text("No sessions yet.")
    assert "null" not in panel.inner_text()


def test_add_an_account_by_domain(page, dashboard):
    open_board(page, dashboard)
    domain = page.get_by_label("Add account by domain")
    domain.fill("gmail.com")
    domain.press("Enter")
    expect(page.locator("#status")).to_contain_text("free-mail or disposable")
    expect(page.locator("#status")).to_have_class("error")
    domain.fill("https://www.Initrode.com/about")
    domain.press("Enter")
    expect(page.locator("#status")).to_contain_text("sent")
    [(_, command)] = read_commands(dashboard.settings, 1)
    assert (command.kind, command.card_id) == ("add", "account:initrode.com")


def test_the_key_is_asked_once_and_never_put_in_a_url(page, dashboard):
    dashboard.seeder.show(*CARDS)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{dashboard.base_url}/board")
    login = page.locator("#login")
    expect(login).to_be_visible()
    login.get_by_label("Site").fill(SITE)
    login.get_by_label("API key").fill(KEY)
    login.get_by_role("button", name="Open").click()
    expect(count(page, "new")).to_have_text("2")
    expect(page.locator("#live")).to_have_text("live")
    page.reload()  # same tab: the key is remembered for the session
    expect(count(page, "new")).to_have_text("2")
    assert requested and not [url for url in requested if KEY in url]
    assert any("/stream?token=" in url for url in requested)


def test_with_the_board_processor_running_moves_are_applied_and_shown(page, dashboard, roles):
    roles.append(Role(dashboard.settings, "board-processor", "worker", "--processors", "board").start())
    open_board(page, dashboard)
    page.drag_and_drop('.card[data-card="account:acme.com"]', '.column[data-stage="decision"]')
    expect(card(page, "account:acme.com", "decision")).to_be_visible(timeout=60_000)  # the board processor applied it
    expect(count(page, "decision")).to_have_text("2")
    page.drag_and_drop('.card[data-card="account:acme.com"]', '.column[data-stage="new"]')
    dialog = page.locator("#force-dialog")
    dialog.get_by_label("Reason for moving this card back").fill("wrong company")
    dialog.get_by_role("button", name="Force move with reason").click()
    expect(card(page, "account:acme.com", "new")).to_be_visible(timeout=30_000)
    expect(count(page, "new")).to_have_text("3")
    expect(count(page, "decision")).to_have_text("1")
    moves = [c for _, c in read_commands(dashboard.settings, 2)]
    outcomes = [dashboard.http.get(f"/v1/sites/{SITE}/boards/pipeline/commands/{c.command_id}").json() for c in moves]
    assert [(o["ok"], o["code"]) for o in outcomes] == [(True, ""), (True, "")]
    assert all(o["stage_change_id"] for o in outcomes)


HOSTILE_TITLE = '<img src=x onerror="window.pwned = 1">Evil Corp'
HOSTILE_TAG = "<script>window.pwned = 2</script>"


def test_hostile_card_titles_and_tags_render_as_text(page, dashboard):
    dashboard.seeder.show(("account:evil.com", HOSTILE_TITLE, (HOSTILE_TAG, "Consideration"), 1))
    page.goto(dashboard.url())
    expect(page.locator("#live")).to_have_text("live")
    evil = card(page, "account:evil.com", "consideration")
    expect(evil.locator(".title")).to_have_text(HOSTILE_TITLE)
    expect(evil.locator(".tag")).to_have_text([HOSTILE_TAG, "Consideration"])
    dashboard.seeder.show(("account:evil2.com", "<b onmouseover=alert(1)>Bold</b>", ("<i>x</i>",), 1))  # live
    expect(card(page, "account:evil2.com", "new").locator(".title")).to_have_text("<b onmouseover=alert(1)>Bold</b>")
    evil.click()
    expect(page.locator("#panel-title")).to_have_text(HOSTILE_TITLE)
    expect(page.locator("#panel-body").get_by_text(f"{HOSTILE_TAG}, Consideration", exact=True)).to_be_visible()
    expect(page.locator("#panel-body").get_by_text(HOSTILE_TITLE, exact=True)).to_be_visible()  # the company
    assert page.locator("#board img, #board script, #board b, #board i, #panel img").count() == 0
    assert page.evaluate("window.pwned") is None


def test_the_owner_shows_on_the_card_and_in_the_panel_by_name(page, dashboard):
    """A site with owners: the card shows its owner's name, the panel the name and email, and the owner field
    offers the site's owners."""
    from schemas.boards import BoardCommand

    assert dashboard.http.put(f"/v1/sites/{SITE}/owners/ann",
                              json={"name": "Ann Example", "email": "ann@sales.example"}).status_code == 200
    open_board(page, dashboard)
    dashboard.seeder.command(BoardCommand("owner-ann", SITE, "pipeline", "account:acme.com", "owner", "user:sales",
                                          text="ann"))
    page.reload()
    acme = card(page, "account:acme.com")
    expect(acme.locator(".owner")).to_have_text("Ann Example")
    acme.click()
    panel = page.get_by_role("complementary", name="Acme")
    expect(panel).to_contain_text("Ann Example <ann@sales.example>")
    expect(panel.locator('select[name="owner"] option')).to_have_text(["(nobody)", "Ann Example"])
