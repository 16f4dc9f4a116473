"""Input contract (RawEvent), enriched-event and dead-letter schemas."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.dead_letter import REASONS, DeadLetter, Rejection
from schemas.events import EVENT_TYPES, EnrichedEvent, RawEvent

VALID = {"event_id": "e-1", "site_id": "site-1", "type": "pageview", "ts": 1_714_550_400_000, "visitor_id": "v-1"}

# The ClickHouse DDL is written against exactly this list: order, names and types.
ENRICHED_COLUMNS = [
    ("event_id", str), ("site_id", str), ("type", str), ("ts_ms", int), ("received_ms", int), ("visitor_id", str),
    ("url", str), ("url_host", str), ("url_path", str), ("url_domain", str), ("referrer", str),
    ("referrer_host", str), ("referrer_domain", str), ("channel", str), ("search_engine", str),
    ("utm_source", str), ("utm_medium", str), ("utm_campaign", str), ("utm_term", str), ("utm_content", str),
    ("click_id_type", str), ("click_id", str), ("title", str), ("ip", str), ("user_agent", str), ("browser", str),
    ("browser_version", str), ("os", str), ("device", str), ("is_bot", bool), ("email", str),
    ("email_domain", str), ("name", str), ("campaign", str), ("properties", str), ("extra", str),
    ("raw_partition", int), ("raw_offset", int), ("session_id", str), ("is_late", bool), ("lead_id", str),
    ("geo_country", str), ("geo_region", str), ("geo_city", str), ("network_asn", int), ("network_org", str),
    ("network_kind", str), ("network_domain", str), ("consent", str), ("may_identify", bool),
]  # fmt: skip


def rejection_for(document: dict) -> Rejection:
    with pytest.raises(ValidationError) as caught:
        RawEvent.model_validate(document)
    return Rejection.from_validation_error(caught.value)


def test_event_types_are_the_contract_list():
    assert EVENT_TYPES == (
        "pageview", "referrer", "exit", "email_open", "email_click", "form_submit", "identify", "custom",
    )  # fmt: skip


def test_enriched_event_columns_are_exactly_the_agreed_list():
    fields = dataclasses.fields(EnrichedEvent)
    assert [(f.name, f.type) for f in fields] == [(name, kind.__name__) for name, kind in ENRICHED_COLUMNS]
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    assert defaults == {"raw_partition": -1, "raw_offset": -1, "session_id": "", "is_late": False, "lead_id": "",
                        "geo_country": "", "geo_region": "", "geo_city": "", "network_asn": 0, "network_org": "",
                        "network_kind": "", "network_domain": "", "consent": "", "may_identify": True}


def test_valid_minimal_event_keeps_unknown_fields_as_extra():
    event = RawEvent.model_validate({**VALID, "plan": {"tier": "pro"}, "visitor_id": "  v-1 "})
    assert event.visitor_id == "v-1"
    assert event.url is None and event.properties == {}
    assert event.model_extra == {"plan": {"tier": "pro"}}


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        (1_714_550_400_123, 1_714_550_400_123),
        (1_714_550_400_123.9, 1_714_550_400_123),
        ("2024-05-01T08:00:00Z", 1_714_550_400_000),
        ("2024-05-01t08:00:00.5z", 1_714_550_400_500),
        ("2024-05-01T10:00:00.123456789+02:00", 1_714_550_400_123),
        ("2024-05-01T03:30:00-04:30", 1_714_550_400_000),
        ("2024-05-01 08:00:00", 1_714_550_400_000),  # naive is UTC
    ],
)
def test_ts_is_normalised_to_epoch_ms_utc(ts, expected_ms):
    assert RawEvent.model_validate({**VALID, "ts": ts}).ts == expected_ms


@pytest.mark.parametrize(
    ("changes", "reason", "field"),
    [
        ({"ts": "1714550400000"}, "invalid_value", "ts"),  # numeric strings are not accepted
        ({"ts": "2024-05-01"}, "invalid_value", "ts"),  # a date is not a date-time
        ({"ts": "2024-02-30T00:00:00Z"}, "invalid_value", "ts"),
        ({"ts": "2024-05-01T00:00:00+24:00"}, "invalid_value", "ts"),
        ({"ts": "２０２４-05-01T00:00:00Z"}, "invalid_value", "ts"),  # non-ASCII digits
        ({"ts": True}, "wrong_type", "ts"),
        ({"ts": float("inf")}, "invalid_value", "ts"),
        ({"ts": None}, "wrong_type", "ts"),
        ({"visitor_id": 42}, "wrong_type", "visitor_id"),
        ({"visitor_id": "   "}, "invalid_value", "visitor_id"),
        ({"visitor_id": "v\x00-1"}, "invalid_value", "visitor_id"),
        ({"event_id": "e" * 129}, "invalid_value", "event_id"),
        ({"url": ["https://a.example/"]}, "wrong_type", "url"),
        ({"url": "https://a.example/" + "x" * 8192}, "invalid_value", "url"),
        ({"user_agent": "x" * 1025}, "invalid_value", "user_agent"),
        ({"type": "click"}, "unknown_event_type", "type"),
        ({"type": 7}, "wrong_type", "type"),
        ({"properties": {"plan": {"tier": "pro"}}}, "wrong_type", "properties"),
        ({"properties": {"tags": ["a"]}}, "wrong_type", "properties"),
        ({"properties": ["a"]}, "wrong_type", "properties"),
        ({"properties": {"k" * 129: 1}}, "invalid_value", "properties"),
    ],
)
def test_invalid_fields_map_to_reasons_and_name_the_field(changes, reason, field):
    rejection = rejection_for({**VALID, **changes})
    assert rejection.reason == reason
    assert f"'{field}'" in rejection.message
    assert "\x00" not in rejection.message


def test_missing_required_field_is_named():
    document = dict(VALID)
    del document["site_id"]
    assert rejection_for(document) == Rejection("missing_field", "missing required field 'site_id'")


def test_property_rejection_names_the_property():
    assert "'plan'" in rejection_for({**VALID, "properties": {"plan": {}}}).message


def test_properties_accept_scalars_and_strip_control_characters():
    properties = {"s": "a\x07b\tc", "i": 1, "f": 1.5, "b": False, "n": None}
    event = RawEvent.model_validate({**VALID, "properties": properties})
    assert event.properties == {"s": "ab\tc", "i": 1, "f": 1.5, "b": False, "n": None}


def test_reasons_are_unique_machine_codes():
    assert len(set(REASONS)) == len(REASONS)
    assert all(reason.isidentifier() and reason.islower() for reason in REASONS)


text = st.text(max_size=30)
enriched_events = st.builds(
    EnrichedEvent,
    **{name: st.booleans() if kind is bool else st.integers(-(2**63), 2**63 - 1) if kind is int else text
       for name, kind in ENRICHED_COLUMNS},
)  # fmt: skip


@given(enriched_events)
def test_enriched_event_json_round_trip(event):
    assert EnrichedEvent.from_json(event.to_json()) == event


@given(enriched_events, st.dictionaries(st.text(min_size=1).filter(lambda k: k not in dict(ENRICHED_COLUMNS)),
                                       st.integers(0, 2**31), max_size=3))
def test_an_enriched_event_of_a_newer_writer_keeps_the_fields_this_reader_knows(event, newer_fields):
    assert EnrichedEvent.from_json(orjson.dumps({**orjson.loads(event.to_json()), **newer_fields})) == event


@given(enriched_events)
def test_an_enriched_event_of_an_older_writer_takes_the_defaults_of_the_fields_added_since(event):
    older = {name: value for name, value in orjson.loads(event.to_json()).items()
             if name not in ("consent", "may_identify")}
    decoded = EnrichedEvent.from_json(orjson.dumps(older))
    assert (decoded.consent, decoded.may_identify) == ("", True)
    assert dataclasses.replace(decoded, consent=event.consent, may_identify=event.may_identify) == event


offsets = st.integers(0, 2**62)


@given(st.builds(DeadLetter, text, text, st.binary(), text, st.integers(0, 2**31), offsets, offsets))
def test_dead_letter_json_round_trip_keeps_raw_bytes_unchanged(letter):
    assert DeadLetter.from_json(letter.to_json()) == letter
