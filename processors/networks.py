"""What an IP address says: its country, the network it is in (AS number, organisation) and what kind of
network that is. Offline: from data a package ships, and from the operator's IP-range table, which wins.

The package is geoip2fast (MIT), whose bundled file holds MaxMind's GeoLite2 Country and ASN data for IPv4
and IPv6 (country code and AS organisation name per network; no AS numbers, regions or cities). Compared
with iptocc, the other maintained offline package: iptocc is smaller (a 0.6 MB wheel, ~0.1 µs a look-up,
data rebuilt nightly from the five registries, MIT/Apache with public registry data) but knows only the
country *registered* for a block, and nothing about the network; geoip2fast knows where a block is used
and who runs it, which is what naming companies needs, at ~10 µs a look-up (cached per IP here) and about
100 MiB of memory in the process that enriches. Updating the data is upgrading geoip2fast; README
"Geo and network data" says how, and what the GeoLite2 licence asks of a deployment.

Kinds (schemas.events.NETWORK_KINDS) come from the organisation's name (`classify_org`): hosting and
cloud providers, ISPs and carriers, universities and research networks, by the words and brands their
names carry; any other named network is an organisation's own ("business"). It is a heuristic on names,
so it decides little by itself: a hosting network flags its traffic as a bot's; a business network names
a company only when its name is the name of a company card (processors/companies.py); ISPs name nothing.
An operator's IP-range row overrides all of it for its range: `company` rows are business networks of
that domain, `isp` and `datacenter` rows are ISPs and hosting, `asn` rows name the organisation only.

Everything is a cached function of the address: the package part per process (its data never changes
while the process runs), the merged facts per `NetworkDirectory` (one per loaded IP-range table).
Unknown, private, reserved and unparsable addresses give no facts, never an error.
"""

from __future__ import annotations

import functools
import gc
import ipaddress
import re
from pathlib import Path

import geoip2fast

from processors.accounts import EMPTY_IP_TABLE, IpRangeTable, NetworkRange
from schemas.events import NO_NETWORK_FACTS, NetworkFacts

PACKAGE_DATA_FILE = Path(geoip2fast.__file__).with_name("geoip2fast-asn-ipv6.dat.gz")
"""Country + ASN, IPv4 + IPv6. Named by its full path: the package would otherwise look in the working
directory first (and its files are pickles)."""

CACHE_SIZE = 65536

_HOSTING_WORDS = (
    "hosting", "host europe", "hostroyale", "datacenter", "data center", "data-center", "datacamp", "colocation",
    "colocrossing", "server", "vps", "cloud", "amazon", "aws", "google-cloud", "microsoft-corp-msn", "azure",
    "digitalocean", "linode", "ovh", "hetzner", "leaseweb", "choopa", "vultr", "contabo", "scaleway",
    "online s.a.s", "oracle-bmc", "alibaba", "tencent", "hivelocity", "quadranet", "m247", "g-core", "gcore",
    "clouvider", "selectel", "stark industries", "egihosting", "psychz",
    "ionos", "1&1", "strato", "godaddy", "rackspace", "softlayer", "equinix", "servers.com", "upcloud",
    "kamatera",
)  # fmt: skip
_EDUCATION_WORDS = (
    "universit", "college", "school", "academ", "education", "research network", "forschungsnetz", "cernet",
    "edu", "institute of technology", "renater", "belnet", "surfnet", "surf b.v", "jisc", "janet", "garr",
    "rediris", "switch", "nordunet", "aarnet", "internet2", "canarie", "aconet", "cesnet", "funet", "uninett",
    "sikt", "heanet", "restena", "grnet", "pionier", "arnes", "carnet", "rnp", "reuna", "ucsd",
)  # fmt: skip
_ISP_WORDS = (
    "telecom", "telekom", "telecommunication", "telco", "broadband", "cable", "mobile", "wireless", "cellular", "cogent",
    "communications", "internet service", "isp", "fiber", "fibre", "dsl", "telefonica", "vodafone", "comcast",
    "verizon", "cellco", "att-internet", "at&t", "charter", "spectrum", "twc-", "cox-", "t-mobile", "orange",
    "telia", "telenor", "telstra", "kpn", "ziggo", "british telecommunications", "sky uk", "virgin media",
    "chinanet", "china unicom", "china mobile", "china telecom", "rostelecom", "megafon", "vimpelcom", "mts pjsc",
    "jio", "airtel", "bharti", "ntt", "softbank", "kddi", "swisscom", "bluewin", "proximus", "free sas", "sfr",
    "bouygues", "liberty global", "telus", "rogers", "bell canada", "shaw", "optus", "tpg", "centurylink",
    "frontier", "windstream", "bellsouth", "mediacom", "cableone", "telmex", "claro", "tim ", "telecom italia",
    "wind tre", "iliad", "movistar", "ooredoo", "etisalat", "turk telekom", "superonline", "korea telecom",
    "sk broadband", "lg dacom", "lg uplus", "hkt", "pldt", "globe telecom", "true internet", "viettel",
    "uunet", "level3", "lumen", "zayo", "hurricane", "sejong", "total play", "axtel", "a1 ", "magyar telekom", "netia",
)  # fmt: skip


def _starts_of_words(words: tuple[str, ...]) -> re.Pattern[str]:
    """Matches a name with one of the words at the start of one of its words ("telecom" in
    "Telecommunications", not "isp" in "Whisper")."""
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(map(re.escape, words)) + ")")


_KIND_PATTERNS = (("hosting", _starts_of_words(_HOSTING_WORDS)), ("education", _starts_of_words(_EDUCATION_WORDS)),
                  ("isp", _starts_of_words(_ISP_WORDS)))


@functools.lru_cache(maxsize=CACHE_SIZE)
def classify_org(org: str) -> str:
    """The kind of network an organisation's name suggests: hosting, education, isp, else business
    ('' for no name). Hosting is checked first: clouds and transit carriers run networks a person rarely
    browses from (transit carriers and CDNs are not on the list: offices and relays browse from them); then
    education (a university's name may contain "communications"); then ISPs."""
    name = org.strip().lower()
    if not name:
        return ""
    return next((kind for kind, pattern in _KIND_PATTERNS if pattern.search(name)), "business")


@functools.cache
def _package() -> geoip2fast.GeoIP2Fast:
    """The package's data, loaded once per process (~0.4 s); `warm_up` does it before the first batch."""
    return geoip2fast.GeoIP2Fast(geoip2fast_data_file=str(PACKAGE_DATA_FILE))


def warm_up() -> str:
    """Load the package's data now (a worker does it at start, not in its first batch); returns its source.

    Then everything loaded so far is frozen out of the garbage collector's sight (`gc.freeze`): the data
    is some 1,600 lists of 5,000 numbers, which every full collection would otherwise walk (~70 ms each,
    several times a minute in a busy worker). It never becomes garbage while the process runs."""
    source = _package().source_info  # (not get_database_info(): it decompresses the whole file again, ~0.2 s)
    gc.freeze()
    return source


@functools.lru_cache(maxsize=CACHE_SIZE)
def canonical_ip(ip: str) -> str:
    """The address in its canonical spelling (an IPv4-mapped IPv6 address as IPv4), or '' if it is none."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


@functools.lru_cache(maxsize=CACHE_SIZE)
def package_facts(ip: str) -> tuple[str, str]:
    """(country code, network organisation) the package gives a canonical address; ('', '') for private,
    reserved and unlisted addresses."""
    found = _package().lookup(ip)
    if found.is_private or len(found.country_code) != 2 or not found.country_code.isalpha():
        return "", ""
    return found.country_code, found.asn_name


_ROW_KINDS = {"company": "business", "isp": "isp", "datacenter": "hosting"}


def _merged(row: NetworkRange | None, country: str, org: str) -> NetworkFacts:
    if row is None:
        return NetworkFacts(country=country, org=org, kind=classify_org(org)) if country or org else NO_NETWORK_FACTS
    org = row.company_name or org
    return NetworkFacts(
        country=row.country or country, region=row.region, city=row.city, asn=row.asn, org=org,
        kind=_ROW_KINDS.get(row.kind) or classify_org(org), domain=row.domain if row.kind == "company" else "",
    )


class NetworkDirectory:
    """IP -> NetworkFacts over one IP-range table and the package's data (the table wins where it has a
    value). Cached per address; a new table means a new directory (the package's cache stays warm)."""

    def __init__(self, ip_table: IpRangeTable = EMPTY_IP_TABLE) -> None:
        self.ip_table = ip_table
        self.look_up = functools.lru_cache(maxsize=CACHE_SIZE)(self._look_up)

    def _look_up(self, ip: str) -> NetworkFacts:
        address = canonical_ip(ip) if ip else ""
        if not address:
            return NO_NETWORK_FACTS
        return _merged(self.ip_table.lookup(address), *package_facts(address))


NO_NETWORKS = NetworkDirectory()
