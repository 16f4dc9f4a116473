"""What LeadStream keeps about people, and in what form: IP truncation, consent, and the dead letters' copy.

Pure functions of their arguments, used where the data is made (enrichment, dead letters), so that every
record written after that point already has the reduced form. How long each ClickHouse table keeps its
rows is `RetentionPolicy`, applied by sinks/retention.py. SECURITY.md ("What is kept, and for how long")
is the reader's version of this file.

- IP addresses: enrichment looks up the full address (country, network, the IP-range account hint) and
  then keeps only its network part (`truncate_ip`: /24 for IPv4, /48 for IPv6 by default); the full
  address only when the operator's setting asks for it, and never for an event without marketing consent.
- Consent (`consent` in the v1 input): the purposes a visitor agreed to. An event may identify its
  visitor (link it to a lead, store an email, reach the lead feed: rules, cards, segments) only with the
  `marketing` purpose, or, when it states no consent at all, if its site does not require consent
  (`may_identify`). Every event is stored for analytics either way.
- Dead letters keep what diagnosis needs: the first bytes of the original with emails masked and the
  value of any `"ip"` field blanked (`minimise_payload`); the message is masked the same way.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any

MARKETING = "marketing"
"""The purpose that lets an event identify its visitor. Any other purpose is kept and stored, never acted on."""

MAX_PURPOSES = 16
MAX_PURPOSE_CHARS = 64
_GRANTED = frozenset(("granted", "true", "yes"))  # string values of a {purpose: value} object that mean yes
_SEPARATORS = re.compile(r"[,\s]+")


@dataclass(frozen=True, slots=True)
class IpPolicy:
    """How much of an IP address is stored: its first `ipv4_prefix` / `ipv6_prefix` bits, or all of it
    with `keep_full` (the LEADSTREAM_IP_KEEP_FULL setting)."""

    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    keep_full: bool = False

    def __post_init__(self) -> None:
        if not (0 <= self.ipv4_prefix <= 32 and 0 <= self.ipv6_prefix <= 128):
            raise ValueError(f"IP prefixes must be 0..32 (IPv4) and 0..128 (IPv6), got /{self.ipv4_prefix} "
                             f"and /{self.ipv6_prefix}")


@dataclass(frozen=True, slots=True)
class ConsentPolicy:
    """Which sites require consent: on those, an event that states no `consent` may not identify anyone.
    On the others (all of them by default) such an event behaves as before consent existed."""

    required_sites: frozenset[str] = frozenset()
    all_sites: bool = False  # LEADSTREAM_CONSENT_REQUIRED_SITES=*

    @classmethod
    def parse(cls, text: str) -> ConsentPolicy:
        """From the setting: '' (no site), '*' (every site) or comma-separated site ids."""
        sites = frozenset(part.strip() for part in text.split(",") if part.strip())
        return cls(all_sites="*" in sites, required_sites=sites - {"*"})

    def requires_consent(self, site_id: str) -> bool:
        return self.all_sites or site_id in self.required_sites


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """Everything enrichment needs to decide what an event keeps."""

    ip: IpPolicy = IpPolicy()
    consent: ConsentPolicy = ConsentPolicy()


DEFAULT_PRIVACY = PrivacyPolicy()


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Days each ClickHouse table keeps its rows, by table name; 0 or a table not listed: kept until erased.
    Defaults and their reasons: README "Retention" (the settings LEADSTREAM_RETENTION_*_DAYS)."""

    days: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        negative = {table: days for table, days in self.days.items() if days < 0}
        if negative:
            raise ValueError(f"retention days must be 0 (keep) or more: {negative}")


@functools.lru_cache(maxsize=65536)
def truncate_ip(ip: str, policy: IpPolicy) -> str:
    """The address as it may be stored: its network address under the policy's prefix (203.0.113.57 ->
    203.0.113.0, 2001:db8:1:2::7 -> 2001:db8:1::), an IPv4-mapped IPv6 address as IPv4, or '' for text that
    is not one address (a forwarded-for list, a port, junk: it could hide a full address). With
    `keep_full`, the address as sent."""
    if policy.keep_full:
        return ip
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = policy.ipv4_prefix if address.version == 4 else policy.ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


@functools.cache
def _truncating(policy: IpPolicy) -> IpPolicy:
    return replace(policy, keep_full=False)


def stored_ip(ip: str, policy: IpPolicy, identifiable: bool) -> str:
    """The one place an event's IP is cut, once its look-ups are done: the whole address only when the
    policy keeps it and the event may identify its visitor (`may_identify`), else its network part."""
    return truncate_ip(ip, policy if identifiable or not policy.keep_full else _truncating(policy))


def _purposes_of(value: Any) -> list[str]:
    if type(value) is str:
        return _SEPARATORS.split(value)
    if type(value) is list:
        return [part for item in value if type(item) is str for part in _SEPARATORS.split(item)]
    if type(value) is dict:
        return [key for key, granted in value.items() if type(key) is str and (
            granted is True or (type(granted) is str and granted.strip().lower() in _GRANTED))]
    return []  # a number, a boolean: stated, but grants nothing


def consent_purposes(value: Any) -> tuple[str, ...] | None:
    """The purposes an event's `consent` grants, normalised (trimmed, lower-case, sorted, unique, at most
    MAX_PURPOSES of at most MAX_PURPOSE_CHARS; one with control characters is dropped); None when the
    event states no consent (absent or null).

    Accepted shapes: a list of purposes (`["analytics", "marketing"]`), one string (`"marketing"`, or
    several separated by commas or spaces), or an object of purpose -> true/"granted" (what consent
    managers report). Unknown purposes are kept; any other shape grants nothing. Never a reason to reject.
    """
    if value is None:
        return None
    purposes = {part.strip().lower()[:MAX_PURPOSE_CHARS] for part in _purposes_of(value) if part.isprintable()}
    purposes.discard("")
    return tuple(sorted(purposes)[:MAX_PURPOSES])


def may_identify(site_id: str, purposes: tuple[str, ...] | None, policy: ConsentPolicy) -> bool:
    """Whether an event may identify its visitor: a stated consent must include marketing; no stated
    consent means yes unless the site requires consent (today's behaviour stays the default)."""
    if purposes is None:
        return not policy.requires_consent(site_id)
    return MARKETING in purposes


# --- dead letters -----------------------------------------------------------------------------------------

_EMAIL_TEXT = re.compile(r"[A-Za-z0-9._+\-]{1,64}(?=(?:@|%40)[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+)")
_EMAIL_BYTES = re.compile(_EMAIL_TEXT.pattern.encode())
_IPV4_TEXT = re.compile(r"(?<![\d.])((?:25[0-5]|2[0-4]\d|1?\d?\d)(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){2})"
                        r"\.(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])")
_IP_FIELD = re.compile(rb'("ip"\s*:\s*")((?:[^"\\]|\\.)*)(")')


def minimise_message(text: str) -> str:
    """A dead letter's message (often an exception's text, which may quote a value): email local parts
    masked (`****@acme.com`), IPv4 addresses cut to their /24 (`203.0.113.0`)."""
    return _IPV4_TEXT.sub(r"\1.0", _EMAIL_TEXT.sub(lambda local: "*" * len(local.group(0)), text))


def minimise_payload(prefix: bytes) -> bytes:
    """A dead letter's copy of the original bytes: email local parts masked with as many `*` (offsets in a
    parser's message still point at the same bytes), the value of every `"ip"` field blanked. Works on
    any bytes, valid JSON or not; a value escaped beyond recognition (`\\u0040`) is not found."""
    return _IP_FIELD.sub(rb"\1\3", _EMAIL_BYTES.sub(lambda local: b"*" * len(local.group(0)), prefix))
