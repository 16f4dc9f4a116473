"""Geo and network look-ups: the package's data, the operator's IP-range table over it, the kinds of network."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.accounts import IpRangeTable
from processors.enrich import validate_and_enrich
from processors.networks import NO_NETWORKS, NetworkDirectory, canonical_ip, classify_org, package_facts, warm_up
from schemas.events import NETWORK_KINDS, NO_NETWORK_FACTS, NetworkFacts

NOW = int(time.time() * 1000)
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
TABLE, BAD = IpRangeTable.from_lines([
    "cidr,domain,company_name,kind,country,region,city,asn",
    "8.8.4.0/24,acme.com,Acme,company,NL,North Holland,Amsterdam,AS64500",  # a company's range inside Google's
    "52.95.110.0/24,,Example Cloud,datacenter",
    "81.2.69.0/24,,Andrews ISP,isp",
    "134.58.0.0/16,,KU Leuven,asn",
])


def test_the_package_names_country_and_network_of_public_addresses() -> None:
    assert "GeoLite2" in warm_up()
    assert package_facts("8.8.8.8") == ("US", "GOOGLE")
    assert package_facts("52.95.110.1") == ("US", "AMAZON-02")
    assert package_facts("2a00:1450:4001:80b::200e")[0] == "DE"


@pytest.mark.parametrize("ip", ["10.1.2.3", "192.168.0.1", "127.0.0.1", "198.51.100.7", "2001:db8::1", "::1",
                                "not-an-ip", "", "999.1.1.1", "1.2.3.4/24", " "])
def test_private_reserved_documentation_and_unparsable_addresses_say_nothing(ip: str) -> None:
    assert NO_NETWORKS.look_up(ip) == NO_NETWORK_FACTS


def test_the_operators_table_wins_over_the_package() -> None:
    assert BAD == []
    directory = NetworkDirectory(TABLE)
    assert directory.look_up("8.8.4.4") == NetworkFacts("NL", "North Holland", "Amsterdam", 64500, "Acme", "business",
                                                        "acme.com")
    assert directory.look_up("8.8.8.8") == NetworkFacts("US", org="GOOGLE", kind="business")  # outside the row
    assert directory.look_up("52.95.110.9") == NetworkFacts("US", org="Example Cloud", kind="hosting")
    assert directory.look_up("81.2.69.160") == NetworkFacts("GB", org="Andrews ISP", kind="isp")
    assert directory.look_up("134.58.64.1") == NetworkFacts("BE", org="KU Leuven", kind="business")  # asn: by name
    assert directory.look_up("::ffff:8.8.4.4") == directory.look_up("8.8.4.4")


def test_a_private_range_of_the_table_has_the_tables_facts_only() -> None:
    table, _ = IpRangeTable.from_lines(["10.0.0.0/8,initech.io,Initech,company,GB"])
    assert NetworkDirectory(table).look_up("10.9.9.9") == NetworkFacts("GB", org="Initech", kind="business",
                                                                        domain="initech.io")


@pytest.mark.parametrize(("org", "kind"), [
    ("AMAZON-02", "hosting"), ("DIGITALOCEAN-ASN", "hosting"), ("Hetzner Online GmbH", "hosting"),
    ("OVH SAS", "hosting"), ("MICROSOFT-CORP-MSN-AS-BLOCK", "hosting"), ("GOOGLE-CLOUD-PLATFORM", "hosting"),
    ("COMCAST-7922", "isp"), ("Deutsche Telekom AG", "isp"), ("Vodafone GmbH", "isp"), ("Chinanet", "isp"),
    ("British Telecommunications PLC", "isp"), ("LEVEL3", "isp"), ("T-MOBILE-AS21928", "isp"),
    ("Massachusetts Institute of Technology", "education"), ("BELNET", "education"),
    ("Verein zur Foerderung eines Deutschen Forschungsnetzes e.V.", "education"), ("UCSD", "education"),
    ("GOOGLE", "business"), ("Acme Robotics Inc.", "business"), ("APPLE-ENGINEERING", "business"),
    ("Whisper Systems", "business"),  # "isp" only at the start of a word
    ("", ""), ("   ", ""),
])
def test_kinds_of_network_from_their_names(org: str, kind: str) -> None:
    assert classify_org(org) == kind


def event(ip: str, user_agent: str = BROWSER) -> bytes:
    return orjson.dumps({"event_id": "e1", "site_id": "s", "type": "pageview", "visitor_id": "v", "ts": NOW, "ip": ip,
                         "user_agent": user_agent})


def test_enrichment_stamps_the_facts_and_hosting_traffic_is_a_bot() -> None:
    directory = NetworkDirectory(TABLE)
    office = validate_and_enrich(event(" 8.8.4.20 "), NOW, networks=directory)
    assert (office.ip, office.geo_country, office.geo_region, office.geo_city, office.network_asn, office.network_org,
            office.network_kind, office.network_domain, office.is_bot) == (
        "8.8.4.0", "NL", "North Holland", "Amsterdam", 64500, "Acme", "business", "acme.com", False)
    cloud = validate_and_enrich(event("52.95.110.1"), NOW, networks=directory)
    assert (cloud.network_kind, cloud.is_bot, cloud.device) == ("hosting", True, "desktop")  # a browser's disguise
    private = validate_and_enrich(event("10.0.0.1"), NOW, networks=directory)
    assert (private.geo_country, private.network_org, private.network_kind, private.is_bot) == ("", "", "", False)


@given(st.one_of(st.ip_addresses().map(str), st.text(max_size=64)))
def test_any_address_gives_facts_of_the_declared_shape_and_never_an_error(ip: str) -> None:
    facts = NetworkDirectory(TABLE).look_up(ip)
    assert facts.country == "" or (len(facts.country) == 2 and facts.country.isupper())
    assert facts.kind in ("",) + NETWORK_KINDS
    assert facts.asn >= 0
    if not canonical_ip(ip):
        assert facts == NO_NETWORK_FACTS
