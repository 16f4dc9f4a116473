"""Event schemas: the v1 input contract (`RawEvent`) and the enriched event every later processor consumes.

`RawEvent` is strict on purpose: a number where a string belongs is the sender's bug and goes to the DLQ
with a reason rather than being silently coerced. Its Python validators raise `PydanticCustomError`
whose type is already a dead-letter reason code; everything else is checked inside pydantic-core.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StringConstraints
from pydantic_core import PydanticCustomError

from schemas.records import build

EventType = Literal["pageview", "referrer", "exit", "email_open", "email_click", "form_submit", "identify", "custom"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)

ID_MAX_CHARS = 128
URL_MAX_CHARS = 8192
USER_AGENT_MAX_CHARS = 1024
TITLE_MAX_CHARS = 2048
EMAIL_MAX_CHARS = 320  # RFC 5321: 64 local + @ + 255 domain
NAME_MAX_CHARS = 256
CAMPAIGN_MAX_CHARS = 256
IP_MAX_CHARS = 64
PROPERTY_KEY_MAX_CHARS = 128

# C0 and C1 control characters. Free text keeps \t (harmless, sometimes meaningful); ids allow none.
TEXT_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"

# RFC 3339 date-time; the time zone is optional (naive means UTC). Linear: no nested quantifiers.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:[Zz]|([+-])(\d{2}):(\d{2}))?",
    re.ASCII,
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
Scalar = str | int | float | bool | None
_SCALAR_TYPES = (str, int, float, bool, type(None))


def strip_controls(text: str) -> str:
    """Removes control characters (except tab) so they cannot reach logs, CSV exports or the dashboard."""
    return TEXT_CONTROLS.sub("", text)


def _rfc3339_to_ms(text: str) -> int:
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise PydanticCustomError("invalid_value", "must be an RFC 3339 date-time or epoch milliseconds")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=timezone.utc)
    except ValueError:
        raise PydanticCustomError("invalid_value", "is not a valid calendar date-time") from None
    offset_minutes = 0
    if sign:
        if int(off_h) > 23 or int(off_m) > 59:
            raise PydanticCustomError("invalid_value", "has an invalid UTC offset")
        offset_minutes = (int(off_h) * 60 + int(off_m)) * (-1 if sign == "-" else 1)
    millis = int(fraction[:3].ljust(3, "0")) if fraction else 0
    return (moment - _EPOCH) // _ONE_MS + millis - offset_minutes * 60_000


def _epoch_ms(value: Any) -> int:
    """`ts` as epoch milliseconds UTC. Numeric strings are refused: "1700000000" is too easily seconds."""
    kind = type(value)
    if kind is int:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise PydanticCustomError("invalid_value", "must be a finite number")
        return int(value)
    if kind is str:
        return _rfc3339_to_ms(value)
    raise PydanticCustomError("wrong_type", "must be an RFC 3339 string or epoch milliseconds (number)")


def _clean_properties(value: Any) -> dict[str, Scalar]:
    """Flat string -> scalar map: anything nested would need a schema the columnar store does not have."""
    if value is None:
        return {}
    if type(value) is not dict:
        raise PydanticCustomError("wrong_type", "must be an object of string to scalar")
    cleaned: dict[str, Scalar] = {}
    for key, item in value.items():
        if type(key) is not str or len(key) > PROPERTY_KEY_MAX_CHARS:
            raise PydanticCustomError(
                "invalid_value", "keys must be strings of at most {limit} characters", {"limit": PROPERTY_KEY_MAX_CHARS}
            )
        if not isinstance(item, _SCALAR_TYPES):
            raise PydanticCustomError(
                "wrong_type", "'{key}' must be a string, number, boolean or null", {"key": strip_controls(key)[:64]}
            )
        cleaned[strip_controls(key)] = strip_controls(item) if type(item) is str else item
    return cleaned


# Checked in pydantic-core (Rust) rather than by Python validators: this runs for every event.
Id = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=ID_MAX_CHARS, pattern=_ID_PATTERN)
]


def _text(max_chars: int) -> Any:
    """Optional free text. Control characters are stripped by enrichment, in one pass over all fields."""
    return Annotated[str, StringConstraints(max_length=max_chars)] | None


class RawEvent(BaseModel):
    """One message on events.raw (contract v1). Unknown top-level fields are kept in `model_extra`."""

    model_config = ConfigDict(strict=True, extra="allow")

    event_id: Id
    site_id: Id
    type: EventType
    ts: Annotated[int, PlainValidator(_epoch_ms)]
    visitor_id: Id
    url: _text(URL_MAX_CHARS) = None
    referrer: _text(URL_MAX_CHARS) = None
    title: _text(TITLE_MAX_CHARS) = None
    ip: _text(IP_MAX_CHARS) = None
    user_agent: _text(USER_AGENT_MAX_CHARS) = None
    email: _text(EMAIL_MAX_CHARS) = None
    name: _text(NAME_MAX_CHARS) = None
    campaign: _text(CAMPAIGN_MAX_CHARS) = None
    properties: Annotated[dict[str, Scalar], PlainValidator(_clean_properties)] = Field(default_factory=dict)
    consent: Any = None  # read by schemas.privacy.consent_purposes: any shape, never a reason to reject


NETWORK_KINDS: tuple[str, ...] = ("isp", "hosting", "business", "education")
"""What kind of network an IP is in (processors/networks.py decides): a consumer ISP or mobile carrier, a
cloud or hosting provider (its traffic is treated as a bot's), an organisation's own network, a university
or research network."""


@dataclass(frozen=True, slots=True)
class NetworkFacts:
    """What one IP address says, as enrichment stamps it on the event (the `geo_*` and `network_*` fields)."""

    country: str = ""
    region: str = ""
    city: str = ""
    asn: int = 0
    org: str = ""
    kind: str = ""
    domain: str = ""


NO_NETWORK_FACTS = NetworkFacts()


@dataclass(slots=True)
class EnrichedEvent:
    """A validated, enriched event. Field order and types are the ClickHouse `events` table's columns.

    Optional inputs are "" rather than None so every column is non-Nullable (cheaper in ClickHouse).
    The geo, network and consent fields come last, with defaults, so records written before them still decode.
    `properties` and `extra` are JSON text with sorted keys, so equal inputs give byte-equal rows.
    """

    event_id: str
    site_id: str
    type: str
    ts_ms: int
    received_ms: int
    visitor_id: str
    url: str
    url_host: str
    url_path: str
    url_domain: str
    referrer: str
    referrer_host: str
    referrer_domain: str
    channel: str
    search_engine: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    utm_term: str
    utm_content: str
    click_id_type: str
    click_id: str
    title: str
    ip: str
    user_agent: str
    browser: str
    browser_version: str
    os: str
    device: str
    is_bot: bool
    email: str
    email_domain: str
    name: str
    campaign: str
    properties: str
    extra: str
    raw_partition: int = -1
    raw_offset: int = -1
    session_id: str = ""
    is_late: bool = False
    lead_id: str = ""
    geo_country: str = ""  # ISO 3166-1 alpha-2, "" when unknown (private, reserved or unlisted addresses)
    geo_region: str = ""  # only where the data has it (an operator's IP-range row)
    geo_city: str = ""
    network_asn: int = 0  # 0: unknown
    network_org: str = ""  # who runs the network: an ISP, a cloud, a company, a university
    network_kind: str = ""  # NETWORK_KINDS, or "" when unknown
    network_domain: str = ""  # the company whose own network this is (an account domain), or ""
    consent: str = ""  # the purposes the event's `consent` granted, sorted, comma-separated ("" if none or absent)
    may_identify: bool = True  # False: stored for analytics only (no lead, no email, not on the lead feed)

    def to_json(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, data: bytes) -> EnrichedEvent:
        return build(cls, orjson.loads(data))


@dataclass(slots=True)
class ForwardedEvent(EnrichedEvent):
    """An event of a lead merged away, passed on to the survivor by the lead processor (on `leads.activity`).
    It may come after the survivor's own later events from the same raw partition, so the survivor tells a
    second delivery of it by its id, not by its raw offset (processors/lead_processor.py)."""
