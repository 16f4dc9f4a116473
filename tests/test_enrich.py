"""Validate + enrich core: one example per rejection reason and per channel, then properties that no
input can make it raise."""

from __future__ import annotations

import re

import crawleruseragents
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors import enrich
from processors.enrich import (
    CHANNELS,
    DEVICES,
    Limits,
    classify_user_agent,
    enrich_batch,
    validate_and_enrich,
)
from schemas.dead_letter import REASONS, Rejection
from schemas.events import EVENT_TYPES, EnrichedEvent

NOW = 1_714_550_400_000  # 2024-05-01T08:00:00Z
HOUR = 3_600_000
DAY = 24 * HOUR

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Mobile/15E148 Safari/604.1"
)
IPAD = (
    "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Mobile/15E148 Safari/604.1"
)
ANDROID_TABLET = (
    "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
HEADLESS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36"
)


def event(**changes) -> dict:
    base = {
        "event_id": "e-1",
        "site_id": "site-1",
        "type": "pageview",
        "ts": NOW - 1000,
        "visitor_id": "v-1",
        "url": "https://www.acme.com/pricing",
        "user_agent": CHROME,
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not ...}


def run(document: dict | bytes | None, limits: Limits = enrich.DEFAULT_LIMITS) -> EnrichedEvent | Rejection:
    value = document if document is None or isinstance(document, bytes) else orjson.dumps(document)
    return validate_and_enrich(value, NOW, limits)


def accepted(**changes) -> EnrichedEvent:
    result = run(event(**changes))
    assert isinstance(result, EnrichedEvent), result
    return result


# --- rejections ------------------------------------------------------------------------------------


REJECTION_CASES = [
    (b'{"event_id": "e-1",', "bad_json"),
    (b"", "bad_json"),
    (b'{"a": "\\ud800"}', "bad_json"),
    (b'{"title": "caf\xe9"}', "bad_encoding"),
    (b"\xff\xfe{}", "bad_encoding"),
    (b"[1, 2]", "not_an_object"),
    (b'"pageview"', "not_an_object"),
    (b"null", "not_an_object"),
    (None, "not_an_object"),  # a tombstone
    (orjson.dumps(event(title="x" * 70_000)), "oversized"),
    (orjson.dumps(event(visitor_id=...)), "missing_field"),
    (orjson.dumps(event(site_id=12)), "wrong_type"),
    (orjson.dumps(event(event_id="e\n1")), "invalid_value"),
    (orjson.dumps(event(type="purchase")), "unknown_event_type"),
    (orjson.dumps(event(ts=NOW + DAY + 1)), "ts_in_future"),
    (orjson.dumps(event(ts=NOW - 730 * DAY - 1)), "ts_too_old"),
    (orjson.dumps(event(ts=1_714_550_400)), "ts_too_old"),  # seconds sent where ms are expected
]


@pytest.mark.parametrize(("value", "reason"), REJECTION_CASES)
def test_rejection_reasons(value, reason):
    result = run(value)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.message


def test_time_limits_are_inclusive_and_configurable():
    assert isinstance(accepted(ts=NOW + DAY), EnrichedEvent)
    assert isinstance(accepted(ts=NOW - 730 * DAY), EnrichedEvent)
    strict = Limits(max_payload_bytes=100, max_future_skew_ms=0, max_age_ms=HOUR)
    assert run(event(ts=NOW + 1), strict).reason == "oversized"
    small = orjson.dumps({"event_id": "e", "site_id": "s", "type": "exit", "visitor_id": "v", "ts": NOW + 1})
    assert run(small, strict).reason == "ts_in_future"
    assert run(small.replace(str(NOW + 1).encode(), str(NOW - HOUR - 1).encode()), strict).reason == "ts_too_old"


def test_extra_fields_too_deep_to_store_are_rejected_not_raised():
    deep = b'{"d":' * 300 + b"{}" + b"}" * 300  # orjson reads 1024 levels but writes only 254
    result = run(orjson.dumps(event()).replace(b'"e-1"', b'"e-1","nested":' + deep))
    assert isinstance(result, Rejection) and result.reason == "invalid_value"


def test_a_bug_in_enrichment_becomes_an_internal_error_rejection(monkeypatch):
    def broken(user_agent: str) -> tuple:
        raise KeyError("boom")

    monkeypatch.setattr(enrich, "classify_user_agent", broken)
    results = enrich_batch([orjson.dumps(event()), b"[]"], NOW)
    assert [r.reason for r in results] == ["internal_error", "not_an_object"]
    assert "KeyError" in results[0].message


# --- channels --------------------------------------------------------------------------------------


CHANNEL_CASES = [
    ({}, "direct", ""),
    ({"referrer": "https://blog.acme.com/post"}, "direct", ""),  # internal navigation
    ({"referrer": "https://www.google.com/"}, "organic", "Google"),
    ({"referrer": "https://www.bing.com/search?q=acme"}, "organic", "Bing"),
    ({"referrer": "https://t.co/abc"}, "social", ""),
    ({"referrer": "https://www.linkedin.com/feed/"}, "social", ""),
    ({"referrer": "https://mail.google.com/mail/u/0/"}, "email", ""),
    ({"referrer": "https://partner.example.org/item?id=1"}, "referral", ""),
    ({"referrer": "not a url"}, "referral", ""),
    ({"type": "email_open", "url": None}, "email", ""),
    ({"url": "https://www.acme.com/?utm_medium=Email&utm_source=may"}, "email", ""),
    ({"url": "https://www.acme.com/?utm_medium=social", "referrer": "https://www.google.com/"}, "social", "Google"),
    ({"url": "https://www.acme.com/?utm_medium=cpc"}, "paid", ""),
    ({"url": "https://www.acme.com/?utm_medium=paid_social"}, "paid", ""),
    ({"url": "https://www.acme.com/?gclid=abc", "referrer": "https://www.google.com/"}, "paid", "Google"),
    ({"type": "email_click", "url": "https://www.acme.com/?fbclid=x"}, "paid", ""),
]


@pytest.mark.parametrize(("changes", "channel", "search_engine"), CHANNEL_CASES)
def test_channels(changes, channel, search_engine):
    result = accepted(**changes)
    assert (result.channel, result.search_engine) == (channel, search_engine)


def test_every_reason_and_channel_has_an_example():
    set_elsewhere = {"duplicate_event", "internal_error"}  # by the pipeline / by the test below
    assert {reason for _, reason in REJECTION_CASES} == set(REASONS) - set_elsewhere
    assert {channel for _, channel, _ in CHANNEL_CASES} == set(CHANNELS)


# --- URL, click ids, user agent, email, hostile strings --------------------------------------------


def test_url_parts_utm_and_click_id_priority():
    result = accepted(
        url="https://WWW.Acme.co.uk:8443/a/b?fbclid=f&utm_source=news&utm_source=second&msclkid=m&utm_term=a+b%21"
    )
    assert (result.url_host, result.url_path, result.url_domain) == ("www.acme.co.uk", "/a/b", "acme.co.uk")
    assert (result.utm_source, result.utm_term, result.utm_medium) == ("news", "a b!", "")
    assert (result.click_id_type, result.click_id) == ("msclkid", "m")


@pytest.mark.parametrize("labels", [125, 126, 1_000, 4_000])  # 253 and 255 chars; 4,000: near the 8 KB limit
def test_a_referrer_host_longer_than_any_dns_name_is_a_referral_not_an_internal_error(labels):
    host = ".".join(["a"] * labels) + ".com"
    result = accepted(referrer=f"https://{host}/page", url="https://www.acme.com/")
    assert (result.channel, result.search_engine, result.referrer_host) == ("referral", "", host)


def test_private_suffix_sites_are_sites_of_their_own():
    """x.blogspot.com's visitors coming from y.blogspot.com are referred, not navigating internally."""
    result = accepted(url="https://x.blogspot.com/2024/post", referrer="https://y.blogspot.com/")
    assert (result.url_domain, result.referrer_domain, result.channel) == ("x.blogspot.com", "y.blogspot.com", "referral")
    assert accepted(url="https://x.blogspot.com/b", referrer="https://x.blogspot.com/a").channel == "direct"


@pytest.mark.parametrize(
    ("url", "host", "domain"),
    [("http://10.0.0.7:8080/x", "10.0.0.7", "10.0.0.7"), ("http://[::1]/", "::1", "::1"), ("http://[::1/", "", "")],
)
def test_hosts_without_public_suffix_and_unparseable_urls(url, host, domain):
    result = accepted(url=url)
    assert (result.url, result.url_host, result.url_domain) == (url, host, domain)


@pytest.mark.parametrize(
    ("user_agent", "browser", "device", "is_bot"),
    [
        (CHROME, "Chrome", "desktop", False),
        (IPHONE, "Mobile Safari", "mobile", False),
        (IPAD, "Mobile Safari", "tablet", False),
        (ANDROID_TABLET, "Chrome", "tablet", False),
        (GOOGLEBOT, "Googlebot", "bot", True),
        (HEADLESS, "HeadlessChrome", "bot", True),
        ("curl/8.4.0", "curl", "bot", True),
        ("", "", "other", False),  # no user agent is not, by itself, a bot
    ],
)
def test_user_agent_classification(user_agent, browser, device, is_bot):
    result = accepted(user_agent=user_agent)
    assert (result.browser, result.device, result.is_bot) == (browser, device, is_bot)
    assert result.device in DEVICES


def test_user_agent_version_and_os():
    assert classify_user_agent(CHROME)[:3] == ("Chrome", "124", "Windows")


def test_grouped_crawler_regex_matches_exactly_like_the_plain_list():
    entries = crawleruseragents.CRAWLER_USER_AGENTS_DATA
    plain = [re.compile(entry["pattern"]) for entry in entries]
    samples = [ua for entry in entries for ua in entry.get("instances", [])] + [CHROME, IPHONE, IPAD, ANDROID_TABLET]
    for ua in samples:
        assert bool(enrich._CRAWLERS.search(ua)) == any(p.search(ua) for p in plain), ua


def test_email_is_normalised_and_email_clicks_take_it_from_the_url():
    assert (accepted(type="identify", email="  Bob@Acme.COM ").email, accepted(email="x").email_domain) == (
        "bob@acme.com",
        "",
    )
    click = accepted(type="email_click", url="https://www.acme.com/?lb_email=Ann%40Acme.com&campaign=1")
    assert (click.email, click.email_domain, click.channel) == ("ann@acme.com", "acme.com", "email")
    assert accepted(type="email_click", url="https://a.example/?email=a@b.example&lb_email=c@d.example").email == (
        "a@b.example"
    )
    assert accepted(type="pageview", url="https://www.acme.com/?email=x@y.example").email == ""
    too_long = "a" * 400 + "@acme.com"
    assert accepted(type="email_click", url=f"https://www.acme.com/?email={too_long}").email == ""


def test_control_characters_are_stripped_from_free_text():
    result = accepted(
        title="Pri\x00cing\r\n\tpage\x9b",
        name="sign\x1bup",
        url="https://www.acme.com/?utm_source=a%00b%0A",
        properties={"note\x07": "x\x08y"},
    )
    assert (result.title, result.name, result.utm_source) == ("Pricing\tpage", "signup", "ab")
    assert orjson.loads(result.properties) == {"note": "xy"}


def test_properties_and_extra_are_sorted_json_text():
    result = accepted(properties={"b": 1, "a": None}, zeta=[1, {"y": 2, "x": 1}], alpha="kept")
    assert result.properties == '{"a":null,"b":1}'
    assert result.extra == '{"alpha":"kept","zeta":[1,{"x":1,"y":2}]}'
    plain = accepted()
    assert (plain.properties, plain.extra, plain.title, plain.email, plain.ip) == ("{}", "{}", "", "", "")


def test_enriched_event_carries_identity_time_and_receipt():
    result = accepted(ts="2024-05-01T09:59:59.250+02:00", ip=" 203.0.113.9 ")
    assert (result.event_id, result.site_id, result.visitor_id, result.type) == ("e-1", "site-1", "v-1", "pageview")
    assert (result.ts_ms, result.received_ms, result.ip) == (NOW - 750, NOW, "203.0.113.0")  # its /24
    assert (result.raw_partition, result.raw_offset, result.session_id, result.lead_id) == (-1, -1, "", "")


# --- properties: nothing raises, batch == one by one ------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["", " ", "\x00", "null", "\u202e", "a\tb", "x" * 200, "%00", "🙂"]
)
urls = st.builds(
    "{}://{}{}{}".format,
    st.sampled_from(["https", "http", "ftp", ""]),
    st.sampled_from(["www.acme.com", "ACME.co.uk:80", "[::1]", "[bad", "user@h", "10.0.0.1", "", "xn--bcher-kva.ch"]),
    st.sampled_from(["", "/", "/p?q=1"]),
    st.lists(
        st.sampled_from(["utm_source=a", "gclid=g", "fbclid=%ZZ", "email=A%40b.c", "lb_email=", "utm_medium=cpc", "&"]),
        max_size=4,
    ).map(lambda parts: "?" + "&".join(parts) if parts else ""),
) | hostile_text
# Valid ids here; mutated_events and the arbitrary-object test supply the broken ones.
ids = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Zs"]), min_size=1, max_size=30)
valid_values = {
    "event_id": ids,
    "site_id": st.sampled_from(["site-1", "s"]),
    "type": st.sampled_from(EVENT_TYPES),
    "ts": st.integers(NOW - 731 * DAY, NOW + DAY + 10) | st.sampled_from(["2024-05-01T08:00:00Z", "2024-05-01 7:00"]),
    "visitor_id": ids,
    "url": urls,
    "referrer": urls,
    "title": hostile_text,
    "ip": hostile_text,
    "user_agent": st.sampled_from([CHROME, IPHONE, GOOGLEBOT, HEADLESS, ""]) | hostile_text,
    "email": hostile_text,
    "name": hostile_text,
    "campaign": hostile_text,
    "properties": st.dictionaries(hostile_text, json_scalars, max_size=4),
}
REQUIRED = ("event_id", "site_id", "type", "ts", "visitor_id")
events = st.fixed_dictionaries(
    {key: valid_values[key] for key in REQUIRED},
    optional={key: strategy for key, strategy in valid_values.items() if key not in REQUIRED},
)
mutated_events = st.builds(
    lambda base, key, value, drop: {k: v for k, v in {**base, key: value}.items() if k != drop},
    events,
    st.sampled_from(sorted(valid_values)) | st.text(max_size=8),
    json_values,
    st.sampled_from([*sorted(valid_values), None]),
)
payloads = st.binary(max_size=300) | events.map(orjson.dumps) | mutated_events.map(orjson.dumps) | json_values.map(
    orjson.dumps
)
# Unique user agents cost ~1.5 ms each in pure-Python ua-parser: keep example counts modest.
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_well_formed(result: EnrichedEvent | Rejection) -> None:
    if isinstance(result, Rejection):
        assert result.reason in REASONS and result.reason != "internal_error", result
        assert result.message
    else:
        assert result.channel in CHANNELS and result.device in DEVICES
        assert result.type in EVENT_TYPES and result.event_id and result.visitor_id
        assert EnrichedEvent.from_json(result.to_json()) == result


@FAST
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(value):
    assert_well_formed(validate_and_enrich(value, NOW))


@FAST
@given(st.one_of(events, st.dictionaries(st.text(max_size=12), json_values, max_size=8)))
def test_arbitrary_json_objects_never_raise(document):
    assert_well_formed(validate_and_enrich(orjson.dumps(document), NOW))


@FAST
@given(mutated_events)
def test_mutated_events_never_raise(document):
    assert_well_formed(validate_and_enrich(orjson.dumps(document), NOW))


@settings(FAST, max_examples=80)
@given(st.lists(payloads | st.none(), max_size=10))
def test_batch_equals_one_by_one(values):
    assert enrich_batch(values, NOW) == [validate_and_enrich(value, NOW) for value in values]
