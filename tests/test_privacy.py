"""Privacy cores: IP truncation, consent (its shapes, the decision, what an event without marketing consent
keeps), and the dead letters' minimal copy. Examples first, then properties; the last property runs the
raw processor on its in-memory store and producer."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors import sessionize
from processors.accounts import AccountsContext
from processors.enrich import Limits, validate_and_enrich, without_email_params
from processors.identity import InMemoryIdentityStore, resolve
from processors.identity_store import IdentityGraphStore
from processors.lookup_tables import LookupTables
from processors.raw_processor import RawEventsProcessor, RawProcessorConfig
from processors.runtime.ingest import Message
from processors.runtime.producer import MemoryProducer, Outputs
from processors.runtime.runner import ProcessorRunner
from processors.runtime.state import MemoryStateStore
from schemas.dead_letter import RAW_PREFIX_BYTES, DeadLetter
from schemas.events import EnrichedEvent
from schemas.identity import IdentityEvent, LeadRow
from schemas.privacy import (
    MAX_PURPOSE_CHARS,
    MAX_PURPOSES,
    ConsentPolicy,
    IpPolicy,
    PrivacyPolicy,
    consent_purposes,
    may_identify,
    minimise_message,
    minimise_payload,
    truncate_ip,
)
from schemas.settings import Settings
from schemas.topics import EVENTS_DLQ, EVENTS_ENRICHED, IDENTITY, IDENTITY_LEADS, LEADS_ACTIVITY
from tests.twins import Clock, records, values

NOW = int(time.time() * 1000)
SITE = "site-1"
FULL_IP = PrivacyPolicy(ip=IpPolicy(keep_full=True))
REQUIRED = PrivacyPolicy(consent=ConsentPolicy(required_sites=frozenset({SITE})))


def enriched(privacy: PrivacyPolicy = PrivacyPolicy(), **fields) -> EnrichedEvent:
    document = {"event_id": "e-1", "site_id": SITE, "type": "pageview", "ts": NOW - 1000, "visitor_id": "v-1",
                "url": "https://acme.com/pricing", **fields}
    result = validate_and_enrich(orjson.dumps(document), NOW, privacy=privacy)
    assert isinstance(result, EnrichedEvent), result
    return result


# --- IP truncation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "stored"), [
    ("203.0.113.57", "203.0.113.0"),
    ("2001:db8:1:2::7", "2001:db8:1::"),
    ("::ffff:198.51.100.9", "198.51.100.0"),  # an IPv4-mapped address is an IPv4 address
    ("10.1.2.3", "10.1.2.0"),
    ("198.51.100.9, 10.0.0.1", ""),  # a forwarded-for list is not one address: nothing of it is kept
    ("198.51.100.9:443", ""),
    ("not an address", ""),
])
def test_an_ip_is_stored_as_its_network_part(ip: str, stored: str) -> None:
    assert truncate_ip(ip, IpPolicy()) == stored
    assert truncate_ip(ip, IpPolicy(keep_full=True)) == ip


def test_the_prefixes_are_settings_and_refuse_impossible_lengths() -> None:
    assert truncate_ip("203.0.113.57", IpPolicy(ipv4_prefix=16)) == "203.0.0.0"
    assert truncate_ip("2001:db8:1:2::7", IpPolicy(ipv6_prefix=64)) == "2001:db8:1:2::"
    with pytest.raises(ValueError):
        IpPolicy(ipv4_prefix=33)
    privacy = Settings(ip_keep_full=1, ipv4_prefix=16, consent_required_sites="a, b").privacy()
    assert privacy.ip == IpPolicy(16, 48, True)
    assert privacy.consent.requires_consent("b") and not privacy.consent.requires_consent("c")
    with pytest.raises(ValueError):
        Settings(ip_keep_full=2).privacy()


@given(st.ip_addresses(), st.integers(0, 32), st.integers(0, 128))
def test_a_truncated_address_is_the_network_of_the_original_and_truncating_again_changes_nothing(
        address, v4_prefix: int, v6_prefix: int) -> None:
    policy = IpPolicy(v4_prefix, v6_prefix)
    stored = truncate_ip(str(address), policy)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = v4_prefix if address.version == 4 else v6_prefix
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    assert ipaddress.ip_address(stored) == network.network_address and address in network
    assert truncate_ip(stored, policy) == stored


def test_enrichment_looks_the_full_address_up_then_stores_its_network_part() -> None:
    event = enriched(ip=" 8.8.8.8 ")
    assert event.ip == "8.8.8.0" and event.geo_country == "US"  # the look-up saw the whole address
    assert enriched(FULL_IP, ip=" 8.8.8.8 ").ip == "8.8.8.8"


# --- consent -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("consent", "purposes"), [
    (["analytics", "marketing"], ("analytics", "marketing")),
    ("Marketing", ("marketing",)),
    ("analytics, marketing", ("analytics", "marketing")),
    ({"marketing": True, "analytics": "granted", "ads": "denied", "x": False}, ("analytics", "marketing")),
    ([" Analytics ", "analytics", "", 7, None, "personalisation"], ("analytics", "personalisation")),
    ([], ()),
    ("", ()),
    (True, ()),  # stated, but not in a shape that grants anything
    (None, None),
])
def test_consent_shapes(consent, purposes) -> None:
    assert consent_purposes(consent) == purposes


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=80), inner, max_size=40),
    max_leaves=60,
)


@given(json_values)
def test_any_consent_value_gives_bounded_normalised_purposes(value) -> None:
    purposes = consent_purposes(value)
    if value is None:
        assert purposes is None
        return
    assert purposes == tuple(sorted(set(purposes))) and len(purposes) <= MAX_PURPOSES
    assert all(p and p == p.strip().lower() and len(p) <= MAX_PURPOSE_CHARS and p.isprintable() for p in purposes)


def test_the_decision_marketing_consent_else_the_sites_default() -> None:
    optional, required = ConsentPolicy(), ConsentPolicy.parse(f"{SITE}")
    everywhere = ConsentPolicy.parse("*")
    assert may_identify(SITE, None, optional)  # today's behaviour stays the default
    assert not may_identify(SITE, None, required) and not may_identify("other", None, everywhere)
    assert may_identify("other", None, required)
    for policy in (optional, required, everywhere):
        assert may_identify(SITE, ("marketing",), policy)
        assert not may_identify(SITE, ("analytics",), policy) and not may_identify(SITE, (), policy)


def test_an_event_without_marketing_consent_is_kept_for_analytics_without_what_identifies_a_person() -> None:
    form = enriched(FULL_IP, type="form_submit", email="Ann@Initech.io", consent=["analytics"], ip="8.8.8.8",
                    url="https://acme.com/demo?utm_source=news&email=ann%40initech.io#top",
                    referrer="https://mail.example/?lb_email=ann@initech.io", properties={"first_name": "Ann"},
                    phone="+31 6 1234")
    assert not form.may_identify and form.consent == "analytics"
    assert (form.email, form.email_domain, form.properties, form.extra) == ("", "", "{}", "{}")
    assert form.url == "https://acme.com/demo?utm_source=news#top" and form.utm_source == "news"
    assert form.referrer == "https://mail.example/"
    assert form.ip == "8.8.8.0"  # never the whole address, whatever the setting
    assert (form.type, form.url_path, form.geo_country) == ("form_submit", "/demo", "US")
    page = enriched(consent=[], properties={"plan": "pro"})
    assert not page.may_identify and page.properties == '{"plan":"pro"}'  # a page's properties are analytics


def test_marketing_consent_or_a_site_without_the_requirement_identifies_as_before() -> None:
    for privacy, fields in ((PrivacyPolicy(), {}), (REQUIRED, {"consent": "marketing,analytics"})):
        form = enriched(privacy, type="form_submit", email="Ann@Initech.io", **fields)
        assert form.may_identify and form.email == "ann@initech.io"
    assert not enriched(REQUIRED, type="form_submit", email="ann@initech.io").may_identify


def test_email_parameters_leave_a_url_and_nothing_else_does() -> None:
    assert without_email_params("https://a.io/p?email=x%40y.z&utm_source=s&lb_email=q") == "https://a.io/p?utm_source=s"
    assert without_email_params("https://a.io/p?email=x") == "https://a.io/p"
    assert without_email_params("https://a.io/p?myemail=x&a=1#f") == "https://a.io/p?myemail=x&a=1#f"
    assert without_email_params("https://a.io/p") == "https://a.io/p"


# --- identity: an event without consent changes nothing ------------------------------------------------

identity_events = st.lists(st.tuples(
    st.sampled_from(["v1", "v2", "v3"]),
    st.sampled_from(["pageview", "form_submit", "identify", "email_click"]),
    st.sampled_from(["", "ann@initech.io", "bob@globex.com"]),
    st.sampled_from([None, ["marketing"], ["analytics"], []]),
    st.sampled_from(["", "office"]),  # an IP-range row naming a company: the IP account hint
), max_size=25)


def _events(specs, privacy: PrivacyPolicy) -> list[EnrichedEvent]:
    events = []
    for i, (visitor, kind, email, consent, network) in enumerate(specs):
        document = {"event_id": f"e{i}", "site_id": SITE, "type": kind, "ts": NOW - 100_000 + i * 1000,
                    "visitor_id": visitor, "email": email or None, "consent": consent}
        event = validate_and_enrich(orjson.dumps(document), NOW, privacy=privacy)
        assert isinstance(event, EnrichedEvent), event
        if network:
            event.network_kind, event.network_domain = "business", "acme.com"
        events.append(event)
    return events


@given(identity_events, st.sampled_from([PrivacyPolicy(), REQUIRED]))
def test_events_without_consent_never_change_the_identity_graph(specs, privacy: PrivacyPolicy) -> None:
    events = _events(specs, privacy)
    everything, consented = InMemoryIdentityStore(), InMemoryIdentityStore()
    result = resolve(events, everything, AccountsContext())
    allowed = [e for e in events if e.may_identify]
    expected = resolve(allowed, consented, AccountsContext())
    assert everything.changes() == consented.changes()
    assert result.identity_events == expected.identity_events
    assert all(lead_id == "" for e, lead_id in zip(events, result.lead_ids) if not e.may_identify)


# --- the raw processor: no consent, no lead feed ------------------------------------------------------


def _raw_runner() -> ProcessorRunner:
    store = MemoryStateStore()
    policy = sessionize.SessionPolicy(default=sessionize.SessionConfig(inactivity_ms=30 * 60_000, grace_ms=3_600_000))
    processor = RawEventsProcessor(RawProcessorConfig("events.raw", policy, Limits(), privacy=REQUIRED),
                                   IdentityGraphStore(store, "ls"), "ls", LookupTables())
    return ProcessorRunner(processor, store, MemoryProducer(EVENTS_DLQ), 4, EVENTS_DLQ, clock_us=Clock(NOW))


def _outputs(raw: list[bytes]) -> Outputs | None:
    """What one batch of these raw values produces."""
    return asyncio.run(_raw_runner().process([Message(0, i, None, v) for i, v in enumerate(raw)])) if raw else None


def _values(outputs: Outputs | None, topic) -> list[bytes]:
    return values(outputs, topic) if outputs is not None else []


def _without_version(value: bytes) -> tuple:
    row = LeadRow.from_json(value)
    row.version = 0
    return tuple(orjson.loads(row.to_json()).items())


@settings(max_examples=40, deadline=None)
@given(identity_events)
def test_events_without_consent_never_reach_the_lead_feed_nor_identity(specs) -> None:
    raw = []
    for i, (visitor, kind, email, consent, _) in enumerate(specs):
        raw.append(orjson.dumps({"event_id": f"e{i}", "site_id": SITE, "type": kind, "ts": NOW - 100_000 + i * 1000,
                                 "visitor_id": visitor, "email": email or None, "consent": consent,
                                 "ip": f"198.51.100.{i + 1}"}))
    allowed = [value for value in raw if orjson.loads(value)["consent"] == ["marketing"]]
    everything, only_allowed = _outputs(raw), _outputs(allowed)
    stored = [EnrichedEvent.from_json(v) for v in _values(everything, EVENTS_ENRICHED)]
    assert len(stored) == len(raw)  # every event is stored for analytics
    assert all(e.ip.endswith(".0") for e in stored)
    silent = {e.event_id for e in stored if not e.may_identify}
    feed = records(everything, LEADS_ACTIVITY) if everything is not None else []
    assert not any(record.event_id in silent for record in feed if not hasattr(record, "handover_id"))
    identity = [IdentityEvent.from_json(v) for v in _values(everything, IDENTITY)]
    assert not any(change.event_id in silent for change in identity)
    # the lead records are the ones the consenting events alone make (same ids and times: same bytes)
    assert sorted(map(_without_version, _values(everything, IDENTITY_LEADS))) == \
        sorted(map(_without_version, _values(only_allowed, IDENTITY_LEADS)))


# --- dead letters --------------------------------------------------------------------------------------


def test_a_dead_letter_keeps_a_prefix_without_emails_or_ip_and_the_whole_payloads_size_and_hash() -> None:
    original = orjson.dumps({"event_id": "e1", "site_id": SITE, "type": "nope", "ip": "203.0.113.57",
                             "email": "ann.smith@initech.io", "url": "https://a.io/?email=bob%40globex.com",
                             "title": "x" * 5000})
    letter = DeadLetter.from_json(DeadLetter("unknown_event_type", "field 'type' from ann@initech.io at 10.9.8.7",
                                             original, "events.raw", 0, 7, NOW).to_json())
    assert (letter.raw_size, letter.raw_sha256) == (len(original), hashlib.sha256(original).hexdigest())
    assert letter.raw_truncated and len(letter.raw) <= RAW_PREFIX_BYTES
    assert b'"ip":""' in letter.raw and b"203.0.113" not in letter.raw
    assert b'"email":"*********@initech.io"' in letter.raw and b"bob" not in letter.raw
    assert letter.message == "field 'type' from ***@initech.io at 10.9.8.0"


@given(st.binary(max_size=3 * RAW_PREFIX_BYTES))
def test_minimising_never_lengthens_and_keeps_bytes_without_emails_or_ips(raw: bytes) -> None:
    kept = minimise_payload(raw[:RAW_PREFIX_BYTES])
    assert len(kept) <= min(len(raw), RAW_PREFIX_BYTES)
    if b"@" not in raw and b"%40" not in raw and b'"ip"' not in raw:
        assert kept == raw[:RAW_PREFIX_BYTES]
    assert minimise_payload(kept) == kept


@given(st.emails(), st.text(max_size=40))
def test_no_email_survives_in_a_message(email: str, around: str) -> None:
    local = email.rpartition("@")[0]
    masked = minimise_message(f"{around} {email} {around}")
    if local.replace(".", "").replace("+", "").replace("-", "").replace("_", "").isalnum() and local.isascii():
        assert f"{local}@" not in masked
