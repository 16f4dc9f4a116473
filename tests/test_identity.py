"""Identity stitching: readable examples first, then properties of the graph.

"Independent" identify events (for the order-independence property required by the issue): events on
different visitors, at most one identify per visitor. Then the final graph (visitor -> lead,
email -> lead, each live lead's email and visitors) must not depend on arrival order. The resolver
actually guarantees more, tested too: with any number of identifies per visitor, the visitor follows
its newest identify by event time (ties: larger email), so visitor -> lead and email -> lead never depend
on arrival order. Only which known lead absorbed an anonymous history may differ (merges are final).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.accounts import DISPOSABLE_EMAIL_DOMAINS, FREE_EMAIL_DOMAINS, AccountsContext
from processors.companies import CompanyDirectory
from processors.identity import (
    PLACEHOLDER_VALUES,
    IdentityChanges,
    IdentityResult,
    InMemoryIdentityStore,
    anonymous_lead_id,
    keys_needed,
    known_lead_id,
    normalise_email,
    resolve,
)
from schemas.companies import Company
from schemas.identity import IdentityEvent, LeadRecord, VisitorLink

SITE = "site-1"
NO_ACCOUNTS = AccountsContext()
ACCOUNTS = AccountsContext(CompanyDirectory([Company("globex.co.uk", "Globex"), Company("initech.io", "Initech")]))
# (network_kind, network_org, network_domain) as enrichment stamps them (processors/networks.py)
NO_NET = ("", "", "")
OFFICE_NET = ("business", "Acme", "acme.com")  # a company row of the IP-range table
CLOUD_NET = ("hosting", "Cloud", "")  # a datacenter row, or a cloud provider's network
HOME_NET = ("isp", "ISP", "")
GLOBEX_NET = ("business", "GLOBEX CORP", "")  # an organisation's own network, named like a company card


@dataclass(slots=True)
class Ev:
    """Stand-in for schemas.events.EnrichedEvent with just what the resolver reads."""

    event_id: str
    type: str
    visitor_id: str
    ts_ms: int
    email: str = ""
    network: tuple[str, str, str] = NO_NET
    is_bot: bool = False
    site_id: str = SITE
    received_ms: int = 10**13  # long after every test event: none is dated in the future unless a test says so
    may_identify: bool = True  # False: no marketing consent (schemas.privacy.may_identify)

    @property
    def network_kind(self) -> str:
        return self.network[0]

    @property
    def network_org(self) -> str:
        return self.network[1]

    @property
    def network_domain(self) -> str:
        return self.network[2]


def pageview(event_id: str, visitor_id: str, ts_ms: int, **extra: object) -> Ev:
    return Ev(event_id, "pageview", visitor_id, ts_ms, **extra)  # type: ignore[arg-type]


def identify(event_id: str, visitor_id: str, ts_ms: int, email: str, kind: str = "form_submit", **extra: object) -> Ev:
    return Ev(event_id, kind, visitor_id, ts_ms, email, **extra)  # type: ignore[arg-type]


def run(events: list[Ev], store: InMemoryIdentityStore | None = None, accounts: AccountsContext = NO_ACCOUNTS
        ) -> tuple[IdentityResult, InMemoryIdentityStore]:
    store = store if store is not None else InMemoryIdentityStore()
    return resolve(events, store, accounts), store


def kinds(result: IdentityResult) -> list[str]:
    return [event.kind for event in result.identity_events]


def of_kind(result: IdentityResult, kind: str) -> list[IdentityEvent]:
    return [event for event in result.identity_events if event.kind == kind]


def lead(store: InMemoryIdentityStore, lead_id: str) -> LeadRecord:
    record = store.get_lead(SITE, lead_id)
    assert record is not None
    return record


def visitor_lead(store: InMemoryIdentityStore, visitor_id: str) -> str:
    link = store.get_visitor_lead(SITE, visitor_id)
    assert link is not None
    return link.lead_id


def graph(changes: IdentityChanges) -> tuple[dict, dict]:
    """The order-independent part of a store built from empty: visitor->lead, live leads."""
    return (
        {key: link.lead_id for key, link in changes.visitors.items()},
        {key: (r.email, tuple(r.visitors)) for key, r in changes.leads.items() if not r.merged_into},
    )


# --- examples ------------------------------------------------------------------------------------------


def test_a_new_visitor_gets_a_deterministic_anonymous_lead() -> None:
    result, store = run([pageview("e1", "v1", 1_000), pageview("e2", "v1", 2_000)])
    anonymous = anonymous_lead_id(SITE, "v1")
    assert result.lead_ids == [anonymous, anonymous]
    assert kinds(result) == ["lead_created"]
    assert lead(store, anonymous) == LeadRecord(anonymous, SITE, "", ["v1"], "", "", 1_000, 2_000, "e1")
    assert anonymous_lead_id("other-site", "v1") != anonymous


def test_identify_merges_the_anonymous_lead_and_links_history() -> None:
    result, store = run([pageview("e1", "v1", 1_000), identify("e2", "v1", 2_000, " Bob@ACME.com ")])
    anonymous, known = anonymous_lead_id(SITE, "v1"), known_lead_id(SITE, "bob@acme.com")
    assert result.lead_ids == [anonymous, known]
    assert kinds(result) == ["lead_created", "lead_created", "account_linked", "lead_merged", "visitor_linked"]
    account, merged, linked = result.identity_events[2:]
    assert (merged.from_lead_id, merged.lead_id) == (anonymous, known)
    assert (linked.visitor_id, linked.from_lead_id, linked.lead_id) == ("v1", anonymous, known)
    assert (account.account_domain, account.reason) == ("acme.com", "email")
    assert lead(store, anonymous).merged_into == known
    assert lead(store, known) == LeadRecord(known, SITE, "bob@acme.com", ["v1"], "acme.com", "", 1_000, 2_000, "e2")


@pytest.mark.parametrize("kind", ["form_submit", "identify", "email_click", "email_open"])
def test_every_identifying_type_links(kind: str) -> None:
    result, store = run([identify("e1", "v1", 1, "ann@initech.io", kind=kind)])
    assert visitor_lead(store, "v1") == known_lead_id(SITE, "ann@initech.io") == result.lead_ids[0]


def test_an_email_on_a_pageview_does_not_identify() -> None:
    """A shared URL may carry someone else's ?email=; only identifying event types link."""
    result, store = run([identify("e1", "v1", 1, "ann@initech.io", kind="pageview")])
    assert result.lead_ids == [anonymous_lead_id(SITE, "v1")]
    assert store.get_lead(SITE, known_lead_id(SITE, "ann@initech.io")) is None


def test_two_devices_of_one_person_share_the_known_lead() -> None:
    result, store = run(
        [pageview("e1", "laptop", 1), pageview("e2", "phone", 2),
         identify("e3", "laptop", 3, "ann@initech.io"),
         identify("e4", "phone", 4, "ann@initech.io", kind="email_click")]
    )
    known = known_lead_id(SITE, "ann@initech.io")
    assert lead(store, known).visitors == ["laptop", "phone"]
    assert visitor_lead(store, "laptop") == visitor_lead(store, "phone") == known
    assert len(of_kind(result, "lead_merged")) == 2


def test_shared_computer_follows_the_latest_identity_without_merging_contacts() -> None:
    result, store = run(
        [identify("e1", "kiosk", 1_000, "ann@initech.io"), pageview("e2", "kiosk", 2_000),
         identify("e3", "kiosk", 3_000, "bob@acme.com"), pageview("e4", "kiosk", 4_000)]
    )
    ann, bob = known_lead_id(SITE, "ann@initech.io"), known_lead_id(SITE, "bob@acme.com")
    assert result.lead_ids == [ann, ann, bob, bob]
    [refused] = of_kind(result, "merge_refused")
    assert (refused.visitor_id, refused.from_lead_id, refused.lead_id, refused.reason) == (
        "kiosk", ann, bob, "visitor_repointed")
    assert not [event for event in of_kind(result, "lead_merged") if event.from_lead_id in (ann, bob)]
    assert lead(store, ann).merged_into == "" and lead(store, ann).visitors == []
    assert lead(store, ann).last_ts_ms == 2_000  # history before the switch stays with Ann
    assert lead(store, bob).visitors == ["kiosk"]


def test_a_late_older_identify_does_not_take_the_visitor_back() -> None:
    result, store = run(
        [identify("new", "kiosk", 5_000, "bob@acme.com"), identify("old", "kiosk", 1_000, "ann@initech.io")]
    )
    ann, bob = known_lead_id(SITE, "ann@initech.io"), known_lead_id(SITE, "bob@acme.com")
    assert result.lead_ids == [bob, ann]  # the old form submit itself still belongs to Ann
    assert of_kind(result, "merge_refused")[0].reason == "older_identity"
    assert visitor_lead(store, "kiosk") == bob


@pytest.mark.parametrize("bad_id", ["", "  ", "null", "UNDEFINED", "guest", "Anonymous", "none", "unknown", "0", "-1",
                                    "test", " null ", "x" * 129, "tab\tid"])
def test_illegal_visitor_ids_are_refused_and_never_become_leads(bad_id: str) -> None:
    result, store = run([pageview("e1", bad_id, 1)])
    assert result.lead_ids == [""]
    [refused] = result.identity_events
    assert refused.kind == "id_refused" and refused.reason.startswith("visitor_id:")
    assert store.changes() == IdentityChanges()


def test_identify_from_an_illegal_visitor_id_reaches_the_lead_without_linking() -> None:
    result, store = run([identify("e1", "undefined", 1, "ann@initech.io")])
    known = known_lead_id(SITE, "ann@initech.io")
    assert result.lead_ids == [known]
    assert kinds(result)[0] == "id_refused"
    assert lead(store, known).visitors == []
    assert store.changes().visitors == {}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [("", "empty"), ("null", "placeholder"), ("bob", "malformed"), ("bob@", "malformed"), ("@acme.com", "malformed"),
     ("bob@@acme.com", "malformed"), ("b ob@acme.com", "malformed"), (".bob@acme.com", "malformed"),
     ("bo..b@acme.com", "malformed"), ("bob@acme", "malformed"), ("bob@-acme.com", "malformed"),
     ("bob@1.2.3.4", "malformed"), ("bob@acme.com.", "malformed"), ("x" * 65 + "@acme.com", "malformed"),
     ("b@" + "a" * 300 + ".com", "too_long"), ("bob@example.com", "reserved_domain"),
     ("bob@shop.test", "reserved_domain")],
)
def test_illegal_emails_are_refused_and_the_visitor_stays_anonymous(raw: str, problem: str) -> None:
    events = [identify("e1", "v1", 1, raw)]
    result, store = run(events)
    assert result.lead_ids == [anonymous_lead_id(SITE, "v1")]
    if raw.strip():
        assert of_kind(result, "id_refused")[0].reason == "email:" + problem
    assert normalise_email(raw) == ("", problem)
    assert all(not lead.email for lead in store.changes().leads.values())


def test_emails_are_normalised_to_one_contact() -> None:
    assert normalise_email("  Ann.Lee+news@Initech.IO ") == ("ann.lee+news@initech.io", "")
    assert normalise_email("ann@bücher.de") == ("ann@xn--bcher-kva.de", "")
    assert known_lead_id(SITE, normalise_email("ANN@INITECH.IO")[0]) == known_lead_id(SITE, "ann@initech.io")


def test_bots_and_datacenter_traffic_are_excluded() -> None:
    events = [pageview("e1", "v1", 1, is_bot=True), identify("e2", "v2", 2, "ann@initech.io", network=CLOUD_NET),
              pageview("e3", "v3", 3, network=HOME_NET)]
    result, store = run(events, accounts=ACCOUNTS)
    assert result.lead_ids == ["", "", anonymous_lead_id(SITE, "v3")]
    assert result.exclusions == ["bot", "datacenter", ""]
    assert {event.visitor_id for event in result.identity_events} == {"v3"}
    assert set(store.changes().visitors) == {(SITE, "v3")}
    assert keys_needed(events).visitors == [(SITE, "v3")]


def test_accounts_from_email_ip_range_and_merge() -> None:
    result, store = run(
        [pageview("e1", "v1", 1, network=OFFICE_NET), identify("e2", "v1", 2, "ann@gmail.com"),
         identify("e3", "v2", 3, "joe@yahoo.com", network=HOME_NET), pageview("e4", "v3", 4, network=OFFICE_NET),
         identify("e5", "v3", 5, "kim@globex.co.uk")],
        accounts=ACCOUNTS,
    )
    ann_anonymous, kim_anonymous = anonymous_lead_id(SITE, "v1"), anonymous_lead_id(SITE, "v3")
    ann, joe, kim = (known_lead_id(SITE, e) for e in ("ann@gmail.com", "joe@yahoo.com", "kim@globex.co.uk"))
    assert lead(store, ann_anonymous).account_domain == "acme.com"  # office IP range
    assert lead(store, ann).account_domain == "acme.com"  # adopted from the merged anonymous lead
    assert lead(store, joe).account_domain == ""  # free-mail at home: no account, never yahoo.com
    assert lead(store, kim).account_domain == "globex.co.uk"  # her email beats her office-IP history
    assert [(e.lead_id, e.reason) for e in of_kind(result, "account_linked")] == [
        (ann_anonymous, "ip_range"), (ann, "merged_lead"), (kim_anonymous, "ip_range"), (kim, "email")]


def test_an_organisations_own_network_names_the_company_card_of_that_name() -> None:
    result, store = run(
        [pageview("e1", "v1", 1, network=GLOBEX_NET), pageview("e2", "v2", 2, network=HOME_NET),
         pageview("e3", "v3", 3, network=("business", "Unknown Corp", "")),
         pageview("e4", "v4", 4, network=("isp", "Globex", ""))],  # an ISP never names a company
        accounts=ACCOUNTS,
    )
    assert [lead(store, anonymous_lead_id(SITE, v)).account_domain for v in ("v1", "v2", "v3", "v4")] == [
        "globex.co.uk", "", "", ""]
    assert [(e.account_domain, e.reason) for e in of_kind(result, "account_linked")] == [("globex.co.uk", "network")]
    assert run([pageview("e1", "v1", 1, network=GLOBEX_NET)])[1].changes().leads[
        SITE, anonymous_lead_id(SITE, "v1")].account_domain == ""  # no company cards: nothing to name


def test_a_redelivered_identify_emits_nothing_new() -> None:
    events = [pageview("e1", "v1", 1), identify("e2", "v1", 2, "ann@initech.io")]
    first, store = run(events)
    again = resolve(events[1:], store, NO_ACCOUNTS)
    assert again.lead_ids == first.lead_ids[1:]
    assert again.identity_events == []


def test_read_through_store_writes_back_only_what_changed() -> None:
    _, base = run([identify("e1", "v1", 1, "ann@initech.io"), pageview("e2", "v2", 2)])
    overlay = InMemoryIdentityStore(base)
    result = resolve([pageview("e3", "v1", 3)], overlay, NO_ACCOUNTS)
    known = known_lead_id(SITE, "ann@initech.io")
    assert result.lead_ids == [known]
    changes = overlay.changes()
    assert (changes.visitors, list(changes.leads)) == ({}, [(SITE, known)])
    assert changes.leads[SITE, known].last_ts_ms == 3
    assert lead(base, known).last_ts_ms == 1  # the backing store is never mutated


def test_keys_needed_plus_linked_leads_cover_every_read() -> None:
    """The adapter's contract: one prefetch of keys_needed, one more for the leads visitor links point to."""
    history = [identify("e1", "v1", 1, "ann@initech.io"), pageview("e2", "v2", 2)]
    _, base = run(history)
    batch = [pageview("e3", "v1", 3), identify("e4", "v2", 4, "bob@acme.com"), pageview("e5", "v9", 5)]
    needed = keys_needed(batch)
    linked = {(SITE, link.lead_id) for key in needed.visitors if (link := base.get_visitor_lead(*key))}

    class RecordingReader:
        def __init__(self) -> None:
            self.visitors: list[tuple[str, str]] = []
            self.leads: list[tuple[str, str]] = []

        def get_visitor_lead(self, site_id: str, visitor_id: str) -> VisitorLink | None:
            self.visitors.append((site_id, visitor_id))
            return base.get_visitor_lead(site_id, visitor_id)

        def get_lead(self, site_id: str, lead_id: str) -> LeadRecord | None:
            self.leads.append((site_id, lead_id))
            return base.get_lead(site_id, lead_id)

    reader = RecordingReader()
    resolve(batch, InMemoryIdentityStore(reader), NO_ACCOUNTS)
    assert set(reader.visitors) <= set(needed.visitors)
    assert set(reader.leads) <= set(needed.leads) | linked
    assert (SITE, known_lead_id(SITE, "bob@acme.com")) in needed.leads


def test_records_round_trip_through_json_and_ignore_unknown_keys() -> None:
    result, store = run([identify("e1", "v1", 1, "ann@initech.io")])
    for event in result.identity_events:
        assert IdentityEvent.from_json(event.to_json()) == event
    record = lead(store, known_lead_id(SITE, "ann@initech.io"))
    assert LeadRecord.from_json(record.to_json()) == record
    extended = orjson.dumps({**orjson.loads(record.to_json()), "added_in_v2": 1})
    assert LeadRecord.from_json(extended) == record
    assert VisitorLink.from_json(VisitorLink("lead_x", 5).to_json()) == VisitorLink("lead_x", 5)


def test_identity_event_ids_are_deterministic_and_distinct() -> None:
    events = [pageview("e1", "v1", 1), identify("e2", "v1", 2, "ann@initech.io")]
    first, _ = run(events)
    second, _ = run(events)
    ids = [event.identity_event_id for event in first.identity_events]
    assert ids == [event.identity_event_id for event in second.identity_events]
    assert len(set(ids)) == len(ids)


# --- trust: future-dated claims, email links, forms naming someone else --------------------------------

HOUR = 3_600_000


def test_a_future_dated_identify_does_not_hold_the_visitor_past_its_arrival() -> None:
    """Clients may be up to a day ahead. A form dated 23 h 59 min ahead used to outrank every real identify
    of the next day; its claim now counts from when it arrived."""
    now = 1_700_000_000_000
    forged = identify("forged", "kiosk", now + 24 * HOUR - 60_000, "mallory@evil.io", received_ms=now)
    real = identify("real", "kiosk", now + 60_000, "ann@initech.io", received_ms=now + 60_000)
    for order in ([forged, real], [real, forged]):
        result, store = run(list(order))
        assert visitor_lead(store, "kiosk") == known_lead_id(SITE, "ann@initech.io")
        assert store.get_visitor_lead(SITE, "kiosk").since_ts_ms == now + 60_000


def test_a_forwarded_link_does_not_take_a_visitor_its_form_identified() -> None:
    """Bob forwards his campaign email to Ann, whose browser filled in a form before: clicking Bob's
    `lb_email` link neither merges Ann into Bob nor re-points her browser; the click stays hers."""
    result, store = run([identify("form", "ann-laptop", 1_000, "ann@initech.io"),
                         identify("click", "ann-laptop", 2_000, "bob@acme.com", kind="email_click")])
    ann, bob = known_lead_id(SITE, "ann@initech.io"), known_lead_id(SITE, "bob@acme.com")
    assert result.lead_ids == [ann, ann]
    assert visitor_lead(store, "ann-laptop") == ann
    [refused] = of_kind(result, "merge_refused")
    assert (refused.from_lead_id, refused.lead_id, refused.email, refused.reason) == (
        ann, bob, "bob@acme.com", "link_on_known_visitor")
    [merged] = of_kind(result, "lead_merged")  # the form's merge of the browser's anonymous lead
    assert merged.lead_id == ann and store.get_lead(SITE, bob) is None


def test_an_anonymous_visitor_is_identified_by_a_link_and_a_later_form_moves_it() -> None:
    result, store = run([identify("click", "v1", 1_000, "bob@acme.com", kind="email_click"),
                         identify("form", "v1", 2_000, "ann@initech.io")])
    assert visitor_lead(store, "v1") == known_lead_id(SITE, "ann@initech.io")
    assert [e.reason for e in of_kind(result, "merge_refused")] == ["visitor_repointed"]


def test_a_form_outranks_a_link_whatever_their_times_and_arrival() -> None:
    form = identify("form", "v1", 1_000, "ann@initech.io")
    later_link = identify("click", "v1", 9_000, "bob@acme.com", kind="email_open")
    for order in ([form, later_link], [later_link, form]):
        _, store = run(list(order))
        assert visitor_lead(store, "v1") == known_lead_id(SITE, "ann@initech.io")


def test_of_two_links_the_earlier_one_holds_the_visitor() -> None:
    """The earlier link is the one that found the browser anonymous; the later one came to a known browser."""
    first = identify("c1", "v1", 1_000, "bob@acme.com", kind="email_click")
    second = identify("c2", "v1", 5_000, "cy@acme.com", kind="email_click")
    for order in ([first, second], [second, first]):
        _, store = run(list(order))
        assert visitor_lead(store, "v1") == known_lead_id(SITE, "bob@acme.com")


def test_a_form_with_someone_elses_email_moves_the_browser_but_never_merges_contacts() -> None:
    """Mallory types Ann's email into a form on Mallory's known browser: from then on the browser is
    Ann's (a shared computer looks the same), Mallory's history stays Mallory's and the two contacts stay
    apart; an anonymous browser would have joined Ann, history included."""
    result, store = run([identify("m1", "mallory-pc", 1_000, "mallory@evil.io"), pageview("m2", "mallory-pc", 1_500),
                         identify("m3", "mallory-pc", 2_000, "ann@initech.io")])
    mallory, ann = known_lead_id(SITE, "mallory@evil.io"), known_lead_id(SITE, "ann@initech.io")
    assert result.lead_ids == [mallory, mallory, ann]
    assert lead(store, mallory).last_ts_ms == 1_500 and lead(store, mallory).merged_into == ""
    assert lead(store, ann).first_ts_ms == 2_000
    assert not [e for e in of_kind(result, "lead_merged") if e.from_lead_id in (mallory, ann)]


# --- bounded leads --------------------------------------------------------------------------------------


def test_a_lead_lists_at_most_the_cap_and_counts_every_visitor() -> None:
    events = [identify(f"e{i}", f"v{i:02}", i, "ann@initech.io") for i in range(12)]
    result = resolve(events, store := InMemoryIdentityStore(), NO_ACCOUNTS, max_visitors=5)
    ann = lead(store, known_lead_id(SITE, "ann@initech.io"))
    assert (ann.visitors, ann.visitor_count) == ([f"v{i:02}" for i in range(5)], 12)  # capped: 5 of 12 listed
    assert set(result.lead_ids) == {ann.lead_id}
    assert all(visitor_lead(store, f"v{i:02}") == ann.lead_id for i in range(12))


def test_eight_thousand_forged_visitors_keep_the_lead_record_small() -> None:
    """One form per forged 128-character visitor id: the record used to pass Kafka's 1 MB message limit."""
    events = [identify(f"e{i}", f"{i:0128}", i, "ann@initech.io") for i in range(8_000)]
    _, store = run(events)
    ann = lead(store, known_lead_id(SITE, "ann@initech.io"))
    assert (len(ann.visitors), ann.visitor_count) == (1_000, 8_000)
    assert len(ann.to_json()) < 140_000


def test_a_stored_lead_over_the_cap_is_cut_back_when_next_touched() -> None:
    store = InMemoryIdentityStore()
    store.put_lead(LeadRecord("lead_big", SITE, "ann@initech.io", [f"v{i:04}" for i in range(1_500)]))
    store.set_visitor_lead(SITE, "v0007", VisitorLink("lead_big", 0))
    resolve([pageview("e1", "v0007", 5)], store, NO_ACCOUNTS)
    big = lead(store, "lead_big")
    assert (len(big.visitors), big.visitor_count, big.last_ts_ms) == (1_000, 1_500, 5)


def test_visitors_a_capped_anonymous_lead_did_not_list_follow_its_merge() -> None:
    store = InMemoryIdentityStore()
    store.put_lead(LeadRecord("lead_imported", SITE, "", ["a", "b"], visitor_count=4))
    for visitor in "abcd":
        store.set_visitor_lead(SITE, visitor, VisitorLink("lead_imported", 0))
    resolve([identify("e1", "a", 10, "ann@initech.io")], store, NO_ACCOUNTS, max_visitors=2)
    ann = known_lead_id(SITE, "ann@initech.io")
    assert (lead(store, ann).visitors, lead(store, ann).visitor_count) == (["a", "b"], 4)
    assert visitor_lead(store, "d") == "lead_imported"  # not listed: not moved yet
    result = resolve([pageview("e2", "d", 20)], store, NO_ACCOUNTS, max_visitors=2)
    assert result.lead_ids == [ann] and visitor_lead(store, "d") == ann
    [linked] = of_kind(result, "visitor_linked")
    assert (linked.visitor_id, linked.from_lead_id, linked.lead_id) == ("d", "lead_imported", ann)
    assert lead(store, ann).visitor_count == 4  # counted by the merge already


# --- properties ----------------------------------------------------------------------------------------

VISITORS = [f"v{i}" for i in range(6)]
EMAILS = ["ann@initech.io", "bob@acme.com", "cy@acme.com", "dee@gmail.com", "eve@mailinator.com"]
IDENTIFYING = ["form_submit", "identify", "email_click", "email_open"]


@st.composite
def independent_identifies(draw: st.DrawFn) -> list[Ev]:
    """At most one identify per visitor (several visitors may share an email), plus pageviews."""
    visitors = draw(st.lists(st.sampled_from(VISITORS), unique=True, max_size=len(VISITORS)))
    events = [identify(f"id-{v}", v, draw(st.integers(0, 50)), draw(st.sampled_from(EMAILS)),
                       kind=draw(st.sampled_from(IDENTIFYING))) for v in visitors]
    views = draw(st.lists(st.tuples(st.sampled_from(VISITORS), st.integers(0, 50)), max_size=8))
    return events + [pageview(f"pv-{i}", v, ts) for i, (v, ts) in enumerate(views)]


@given(independent_identifies().flatmap(lambda evs: st.tuples(st.just(evs), st.permutations(evs))))
def test_graph_does_not_depend_on_the_order_of_independent_identifies(pair: tuple[list[Ev], list[Ev]]) -> None:
    events, shuffled = pair
    _, store = run(events)
    _, other = run(shuffled)
    assert graph(store.changes()) == graph(other.changes())
    for event in events:
        expected = known_lead_id(SITE, event.email) if event.email else None
        if expected:
            assert visitor_lead(store, event.visitor_id) == expected


any_identifies = st.lists(
    st.tuples(st.sampled_from(VISITORS), st.integers(0, 20), st.sampled_from(EMAILS)), max_size=12
).map(
    lambda rows: [identify(f"id-{i}", visitor, ts, email) for i, (visitor, ts, email) in enumerate(rows)])


@given(any_identifies.flatmap(lambda evs: st.tuples(st.just(evs), st.permutations(evs))))
def test_a_visitor_follows_its_newest_identify_whatever_the_arrival_order(pair: tuple[list[Ev], list[Ev]]) -> None:
    events, shuffled = pair
    _, store = run(events)
    _, other = run(shuffled)
    mine, theirs = graph(store.changes()), graph(other.changes())
    assert mine[:2] == theirs[:2]
    for visitor in {event.visitor_id for event in events}:
        newest = max((event.ts_ms, event.email) for event in events if event.visitor_id == visitor)
        assert visitor_lead(store, visitor) == known_lead_id(SITE, newest[1])


def mixed_events() -> st.SearchStrategy[list[Ev]]:
    """Anything the resolver may see: bad ids and emails, bots, datacenter and office IPs."""
    visitor_ids = st.sampled_from(VISITORS + ["null", ""])
    emails = st.sampled_from(EMAILS + ["", "not-an-email", "ANN@INITECH.IO", "x@example.com"])
    event = st.builds(
        Ev, event_id=st.just(""), type=st.sampled_from(IDENTIFYING + ["pageview", "custom"]),
        visitor_id=visitor_ids, ts_ms=st.integers(0, 100), email=emails,
        network=st.sampled_from([NO_NET, OFFICE_NET, HOME_NET, CLOUD_NET, GLOBEX_NET]),
        is_bot=st.sampled_from([False, False, False, True]),
    )
    return st.lists(event, max_size=20).map(
        lambda evs: [Ev(f"e{i}", e.type, e.visitor_id, e.ts_ms, e.email, e.network, e.is_bot)
                     for i, e in enumerate(evs)]
    )


@given(mixed_events())
def test_two_known_contacts_are_never_merged_and_the_graph_stays_consistent(events: list[Ev]) -> None:
    result, store = run(events, accounts=ACCOUNTS)
    leads = store.changes().leads
    for (site, lead_id), record in leads.items():
        if record.email:
            assert record.merged_into == "" and lead_id == known_lead_id(site, record.email)
    for merged in of_kind(result, "lead_merged"):
        assert leads[SITE, merged.from_lead_id].email == ""
    owners: dict[str, str] = {}
    for record in leads.values():
        for visitor in record.visitors:
            assert visitor not in owners, "a visitor belongs to one lead"
            owners[visitor] = record.lead_id
    assert owners == {visitor: link.lead_id for (_, visitor), link in store.changes().visitors.items()}


@given(mixed_events(), st.lists(st.integers(1, 20), min_size=1))
def test_batches_give_the_same_result_as_one_by_one(events: list[Ev], cuts: list[int]) -> None:
    whole, whole_store = run(events, accounts=ACCOUNTS)
    chunked_store = InMemoryIdentityStore()
    lead_ids: list[str] = []
    identity_events: list[IdentityEvent] = []
    start = 0
    for size in cuts * (len(events) + 1):
        if start >= len(events):
            break
        part = resolve(events[start:start + size], chunked_store, ACCOUNTS)
        lead_ids += part.lead_ids
        identity_events += part.identity_events
        start += size
    assert lead_ids == whole.lead_ids
    assert identity_events == whole.identity_events
    assert chunked_store.changes() == whole_store.changes()


@given(mixed_events(), st.data())
def test_redelivered_events_leave_the_graph_unchanged(events: list[Ev], data: st.DataObject) -> None:
    """At-least-once delivery: re-applying already applied events converges to the same graph (the
    adapter still skips applied offsets, since a replay may add audit events such as older_identity)."""
    _, store = run(events, accounts=ACCOUNTS)
    before = graph(store.changes())
    redelivered = data.draw(st.lists(st.sampled_from(events), max_size=10)) if events else []
    resolve(redelivered, store, ACCOUNTS)
    assert graph(store.changes()) == before


@given(mixed_events())
def test_no_account_is_ever_a_free_or_disposable_provider(events: list[Ev]) -> None:
    result, store = run(events, accounts=ACCOUNTS)
    personal = FREE_EMAIL_DOMAINS | DISPOSABLE_EMAIL_DOMAINS
    assert all(record.account_domain not in personal for record in store.changes().leads.values())
    assert all(event.account_domain not in personal for event in result.identity_events)


@given(st.lists(st.sampled_from(VISITORS), min_size=1, unique=True), st.data())
def test_merging_an_anonymous_lead_moves_all_its_visitors(visitors: list[str], data: st.DataObject) -> None:
    """Anonymous leads with several visitors can come from an import or a later cross-device rule."""
    store = InMemoryIdentityStore()
    anonymous = "lead_imported"
    store.put_lead(LeadRecord(anonymous, SITE, "", sorted(visitors), "", "", 5, 9, "import"))
    for visitor in visitors:
        store.set_visitor_lead(SITE, visitor, VisitorLink(anonymous, 5))
    who = data.draw(st.sampled_from(visitors))
    result = resolve([identify("e1", who, 10, "ann@initech.io")], store, NO_ACCOUNTS)
    known = known_lead_id(SITE, "ann@initech.io")
    assert all(visitor_lead(store, visitor) == known for visitor in visitors)
    assert lead(store, known).visitors == sorted(visitors)
    assert (lead(store, anonymous).visitors, lead(store, anonymous).merged_into) == ([], known)
    assert sorted(event.visitor_id for event in of_kind(result, "visitor_linked")) == sorted(visitors)
    assert lead(store, known).first_ts_ms == 5


SPEC_ILLEGAL = ["", "null", "undefined", "guest", "anonymous", "none", "unknown", "0", "-1", "test"]
illegal_visitor_ids = st.one_of(
    st.tuples(st.sampled_from(SPEC_ILLEGAL), st.sampled_from(["", " ", "\t"]), st.booleans()).map(
        lambda t: t[1] + (t[0].upper() if t[2] else t[0]) + t[1]),
    st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=129, max_size=200),
    st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=10).map(lambda s: s + "\x00"),
)
legal_visitor_ids = st.text(st.characters(codec="ascii", categories=["L", "N", "Pd"]), min_size=1, max_size=64).filter(
    lambda s: s.strip().lower() not in PLACEHOLDER_VALUES)
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)


def _email(local: str, domain_labels: list[str], tld: str, upper: bool) -> str:
    email = f"{local}@{'.'.join(domain_labels)}.{tld}"
    return email.upper() if upper else email


legal_emails = st.builds(
    _email,
    st.lists(labels, min_size=1, max_size=3).map(".".join), st.lists(labels, min_size=1, max_size=2),
    st.sampled_from(["com", "io", "co.uk", "de", "nl"]), st.booleans(),
).filter(lambda email: "@example." not in email.lower())
illegal_emails = st.one_of(
    st.sampled_from(SPEC_ILLEGAL[1:]),
    legal_emails.map(lambda e: e.replace("@", "")),
    legal_emails.map(lambda e: e.replace("@", "@@")),
    legal_emails.map(lambda e: e.replace("@", " @")),
    legal_emails.map(lambda e: e.replace("@", "..@.")),
    legal_emails.map(lambda e: e + "\n@x.com"),
    legal_emails.map(lambda e: "x" * 250 + e),
    legal_emails.map(lambda e: e.split("@")[0] + "@example.com"),
)


@given(st.lists(st.one_of(illegal_visitor_ids.map(lambda v: (v, False)), legal_visitor_ids.map(lambda v: (v, True))),
                max_size=6),
       st.lists(st.one_of(illegal_emails.map(lambda e: (e, False)), legal_emails.map(lambda e: (e, True))), max_size=6))
def test_refusals_happen_exactly_for_illegal_ids_and_emails(
    visitor_ids: list[tuple[str, bool]], emails: list[tuple[str, bool]]
) -> None:
    events = [pageview(f"v{i}", visitor, i) for i, (visitor, _) in enumerate(visitor_ids)]
    events += [identify(f"m{i}", "v-ok", i, email) for i, (email, _) in enumerate(emails)]
    result, _ = run(events)
    refused = {event.event_id for event in of_kind(result, "id_refused")}
    expected = {f"v{i}" for i, (_, legal) in enumerate(visitor_ids) if not legal}
    expected |= {f"m{i}" for i, (_, legal) in enumerate(emails) if not legal}
    assert refused == expected


claims = st.lists(
    st.tuples(st.sampled_from(VISITORS[:3]), st.integers(0, 20), st.integers(0, 30), st.sampled_from(EMAILS),
              st.sampled_from(IDENTIFYING)),
    max_size=12,
).map(lambda rows: [identify(f"id-{i}", visitor, ts, email, kind=kind, received_ms=ts - skew)
                    for i, (visitor, ts, skew, email, kind) in enumerate(rows)])


def strongest_claim(event: Ev) -> tuple[int, int, str]:
    """The specification, restated: forms beat links, newest form and earliest link win, times are capped
    at arrival, ties go to the larger email."""
    ts = min(event.ts_ms, event.received_ms)
    return (0, -ts, event.email) if event.type in ("email_click", "email_open") else (1, ts, event.email)


@given(claims.flatmap(lambda evs: st.tuples(st.just(evs), st.permutations(evs))))
def test_a_visitor_follows_its_strongest_claim_whatever_the_dates_and_the_arrival_order(
    pair: tuple[list[Ev], list[Ev]]
) -> None:
    """Some claims are dated up to 30 ms after they arrived: those never win on their event time."""
    events, shuffled = pair
    _, store = run(events)
    _, other = run(shuffled)
    for visitor in {event.visitor_id for event in events}:
        strongest = max(strongest_claim(event) for event in events if event.visitor_id == visitor)
        assert visitor_lead(store, visitor) == visitor_lead(other, visitor) == known_lead_id(SITE, strongest[2])


@given(mixed_events(), st.integers(1, 3), st.data())
def test_the_visitor_cap_holds_and_the_count_stays_exact_whatever_the_order(
    events: list[Ev], cap: int, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(events))
    store = InMemoryIdentityStore()
    resolve(shuffled, store, ACCOUNTS, max_visitors=cap)
    changes = store.changes()
    linked: dict[str, set[str]] = {}
    for (_, visitor), link in changes.visitors.items():
        linked.setdefault(link.lead_id, set()).add(visitor)
    for (_, lead_id), record in changes.leads.items():
        assert len(record.visitors) <= cap
        assert set(record.visitors) <= linked.get(lead_id, set())
        assert record.visitor_count == len(linked.get(lead_id, ()))
