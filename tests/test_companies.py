"""Company cards without servers: validating rows and files, the directory's name index, and the pure parts
of the enrichment provider's loop (reading an answer, the rate limit, the breaker)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.companies import (CompanyDirectory, employees_lower_bound, organisation_key, parse_company,
                                  read_company_file)
from processors.company_resolver import Breaker, ProviderError, RateLimit, card_from_answer
from schemas.companies import Company

NOW = 1_800_000_000_000
GOOD = {"domain": "https://www.Acme.com/about", "name": "Acme Inc", "industry": "Software", "employees": "1,001 - 5,000",
        "country": "nl", "website": "https://acme.com/", "linkedin_url": "https://www.linkedin.com/company/acme",
        "logo_url": "https://acme.com/logo.png"}


def test_a_good_row_becomes_a_normalised_card() -> None:
    assert parse_company(GOOD, "file", NOW) == Company(
        "acme.com", "Acme Inc", "Software", "1001-5000", 1001, "NL", "https://acme.com/",
        "https://www.linkedin.com/company/acme", "https://acme.com/logo.png", "file", NOW)
    assert parse_company({"domain": "globex.io", "name": "Globex", "employees": 12}, "file", NOW).employees_min == 12


@pytest.mark.parametrize(("change", "reason"), [
    ({"domain": ""}, "domain is missing"),
    ({"domain": "gmail.com"}, "personal_email_domain"),
    ({"domain": "not a domain"}, "not_a_domain"),
    ({"name": ""}, "name is missing"),
    ({"name": "A\x07B"}, "control characters"),
    ({"name": "x" * 201}, "longer than 200"),
    ({"employees": "200-51"}, "not a head count"),
    ({"employees": "lots"}, "not a head count"),
    ({"country": "Netherlands"}, "ISO 3166-1"),
    ({"website": "ftp://acme.com"}, "not an http(s) URL"),
    ({"linkedin_url": "https://example.com/acme"}, "not a linkedin.com URL"),
    ({"source": "Bad Source!"}, "source"),
    ({"revenue": "1M"}, "unknown field(s) 'revenue'"),
    ({"industry": ["a"]}, "industry must be text"),
])
def test_bad_rows_are_refused_with_a_reason(change: dict, reason: str) -> None:
    refused = parse_company(GOOD | change, "file", NOW)
    assert isinstance(refused, str) and reason in refused


def test_a_file_loads_its_good_rows_and_lists_the_bad_ones_with_their_lines() -> None:
    csv_text = ("domain,name,industry,employees,country\n"
                "acme.com,Acme,Software,51-200,NL\n"  # 2
                "gmail.com,Google Mail,,,US\n"  # 3 refused
                "globex.io,Globex,Logistics,10001+,us\n"  # 4
                "www.acme.com,Acme again,,,\n"  # 5 the same domain
                "initech.io,Initech\n"  # 6 short
                "\n"
                '"wayne.com","Wayne, Inc","Defense","201-500","US"\n')  # 8 quoted
    cards, bad = read_company_file(csv_text, jsonl=False, updated_ms=NOW)
    assert [card.domain for card in cards] == ["acme.com", "globex.io", "wayne.com"]
    assert [(line.line_no, line.reason.split(" ")[0]) for line in bad] == [(3, "domain"), (5, "duplicate"),
                                                                            (6, "expected")]
    assert cards[2].name == "Wayne, Inc" and cards[1].country == "US" and cards[1].employees_min == 10001
    jsonl = "\n".join([orjson.dumps(GOOD).decode(), "{not json", "[1, 2]", "", orjson.dumps({"domain": "x.io"}).decode()])
    cards, bad = read_company_file(jsonl, jsonl=True, updated_ms=NOW)
    assert [card.domain for card in cards] == ["acme.com"]
    assert [(line.line_no, line.reason.split(":")[0]) for line in bad] == [(2, "not JSON"), (3, "not a JSON object"),
                                                                            (5, "name is missing")]


def test_the_same_card_loaded_again_is_the_same_card() -> None:
    first, second = (parse_company(GOOD, "file", ms) for ms in (NOW, NOW + 1))
    assert first.same_card(second) and first != second
    assert not first.same_card(parse_company(GOOD | {"industry": "Hardware"}, "file", NOW))


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from(["-", " - ", "–"]))
def test_employees_lower_bound_is_the_ranges_first_number(low: int, span: int, dash: str) -> None:
    high = low + span
    assert employees_lower_bound(f"{low}-{high}") == low
    assert employees_lower_bound(f"{low:,}+") == low
    assert employees_lower_bound(f"{high}-{low}") == (low if span == 0 else None)
    assert employees_lower_bound(f"{low}{dash}{high}") in (low, None)  # an en dash is no range: refused
    assert employees_lower_bound("") == 0


@pytest.mark.parametrize(("name", "key"), [
    ("Acme Robotics, Inc.", "acmerobotics"), ("ACME-ROBOTICS", "acmerobotics"), ("Ácme Robotics GmbH", "acmerobotics"),
    ("Globex Corporation", "globex"), ("The Boring Company", "theboring"), ("B.V.", "bv"), ("", ""),
])
def test_organisation_names_are_spelt_loosely(name: str, key: str) -> None:
    assert organisation_key(name) == key


def test_the_directory_names_a_company_only_when_its_name_is_unambiguous() -> None:
    directory = CompanyDirectory([Company("acme.com", "Acme Robotics"), Company("globex.io", "Globex"),
                                  Company("globex.co.uk", "Globex Ltd"), Company("ab.se", "AB")])
    assert directory.domain_for_org("ACME-ROBOTICS") == "acme.com"
    assert directory.domain_for_org("GLOBEX") == ""  # two cards of that name: neither
    assert directory.domain_for_org("AB") == ""  # too short a name to go on
    directory.apply([Company("globex.co.uk", "Globex UK")])  # renamed: the name is unambiguous again
    assert directory.domain_for_org("Globex Inc") == "globex.io"
    assert directory.get("globex.co.uk").name == "Globex UK" and len(directory) == 4


def test_a_providers_answer_is_a_card_unknown_or_garbage() -> None:
    answer = {"name": "Acme", "industry": "Software", "employees": "51-200", "funding": "Series B", "source": "x"}
    card = card_from_answer("acme.com", answer, "provider:enrich.test", NOW)
    assert (card.domain, card.industry, card.source) == ("acme.com", "Software", "provider:enrich.test")
    assert card_from_answer("acme.com", None, "p", NOW) is None and card_from_answer("acme.com", {}, "p", NOW) is None
    for garbage in (["Acme"], "Acme", {"name": ""}, {"name": "Globex", "domain": "globex.io"},
                    {"name": "Acme", "employees": "many"}):
        with pytest.raises(ProviderError):
            card_from_answer("acme.com", garbage, "p", NOW)


def test_the_rate_limit_spaces_look_ups() -> None:
    limit = RateLimit(per_minute=60)
    assert limit.wait_s(100.0) == 0.0  # a full bucket
    assert limit.wait_s(100.0) == pytest.approx(1.0)
    assert limit.wait_s(100.5) == pytest.approx(0.5)
    assert limit.wait_s(101.0) == 0.0
    assert limit.wait_s(200.0) == 0.0 and limit.wait_s(200.0) > 0  # a long pause does not save up a burst


def test_the_breaker_opens_after_failures_and_one_probe_decides() -> None:
    breaker = Breaker(failures_to_open=3, open_s=60.0)
    for at in (0.0, 1.0, 2.0):
        assert breaker.allows(at)
        breaker.record(False, at)
    assert breaker.blocked(30.0) and not breaker.allows(30.0)
    assert breaker.allows(62.0)  # half-open: this one is the probe...
    assert breaker.blocked(62.5) and not breaker.allows(62.5)  # ...and no other goes meanwhile
    breaker.record(False, 63.0)
    assert breaker.blocked(100.0) and breaker.allows(123.0)
    breaker.record(True, 123.5)
    assert not breaker.blocked(123.6) and breaker.allows(123.6) and breaker.allows(123.7)
