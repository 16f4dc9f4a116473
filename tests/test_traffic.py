"""Synthetic traffic: deterministic, honest counters, contract-shaped events, every scenario present, and
only documentation IP addresses. Malformed messages are checked against the real validator: each must get
the DLQ reason it was built to get."""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from datetime import datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leadstream.traffic import (
    COMPANIES,
    CRAWLER_USER_AGENTS,
    DAY,
    DEFAULT_START_MS,
    DISPOSABLE_DOMAINS,
    FREE_MAIL_DOMAINS,
    HEADLESS_USER_AGENT,
    MALFORMED_REASONS,
    MINUTE,
    TrafficGenerator,
    TrafficMix,
    generate,
    ip_range_table_lines,
    plan,
    rfc3339_writer,
)
from processors.accounts import IpRangeTable, is_personal_email_domain, registrable_domain
from processors.networks import NetworkDirectory
from processors.enrich import CHANNELS, enrich_batch
from schemas.dead_letter import REASONS, Rejection
from schemas.events import EVENT_TYPES, EnrichedEvent
from schemas.privacy import IpPolicy, PrivacyPolicy

VISITORS = 3000
NOW_MS = DEFAULT_START_MS + 12 * DAY  # the receiver's clock: after all of the generated history
DOCUMENTATION_NETWORKS = tuple(
    ipaddress.ip_network(cidr) for cidr in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


class Run:
    """One generated stream, its counters as they stood at the end, and the validator's verdicts."""

    def __init__(self, generator: TrafficGenerator) -> None:
        self.generator = generator
        self.messages = list(generator.events())
        # whole addresses kept: these tests check where the generator's addresses resolve
        self.results = enrich_batch([value for _, value in self.messages], NOW_MS,
                                    privacy=PrivacyPolicy(ip=IpPolicy(keep_full=True)))
        self.accepted = [result for result in self.results if isinstance(result, EnrichedEvent)]
        self.documents = [orjson.loads(value) for (_, value), result in zip(self.messages, self.results)
                          if isinstance(result, EnrichedEvent)]  # fmt: skip


@pytest.fixture(scope="module")
def run() -> Run:
    return Run(TrafficGenerator(VISITORS, seed=7, now_ms=NOW_MS))


@pytest.fixture(scope="module")
def broken_run() -> Run:
    """Many malformed messages, so that every reason shows up in a small run."""
    return Run(TrafficGenerator(300, seed=3, now_ms=NOW_MS, malformed_ratio=0.1, duplicate_ratio=0.05))


# -- determinism -------------------------------------------------------------------------------------


def test_same_arguments_give_the_same_bytes_and_counters() -> None:
    first, second = TrafficGenerator(200, seed=11), TrafficGenerator(200, seed=11)
    assert list(first.events()) == list(second.events())
    assert (first.valid, first.duplicates, first.malformed, first.by_type) == (
        second.valid, second.duplicates, second.malformed, second.by_type,
    )  # fmt: skip


def test_events_can_be_replayed_from_the_same_generator() -> None:
    generator = TrafficGenerator(150, seed=5)
    once, valid_once = list(generator.events()), generator.valid
    assert list(generator.events()) == once
    assert generator.valid == valid_once  # counters restart rather than accumulate


def test_seed_and_site_change_the_stream() -> None:
    base = list(TrafficGenerator(100, seed=1).events())
    assert list(TrafficGenerator(100, seed=2).events()) != base
    other_site = list(TrafficGenerator(100, seed=1, site_ids=("other",)).events())
    assert not {value for _, value in base} & {value for _, value in other_site}  # no shared event ids
    assert plan(100, 1) == TrafficGenerator(100, seed=1, site_ids=("other",)).mix  # same people, though


def test_generate_yields_what_events_yields() -> None:
    assert list(generate(80, seed=9)) == list(TrafficGenerator(80, seed=9).events())


# -- counters and the plan ---------------------------------------------------------------------------


def test_every_malformed_message_gets_the_reason_it_was_built_for(broken_run: Run) -> None:
    rejected = Counter(result.reason for result in broken_run.results if isinstance(result, Rejection))
    assert rejected == {reason: count for reason, count in broken_run.generator.malformed.items() if count}
    assert all(broken_run.generator.malformed[reason] > 0 for reason in MALFORMED_REASONS)
    assert set(MALFORMED_REASONS) <= set(REASONS)


def test_counters_match_what_was_yielded(broken_run: Run) -> None:
    generator = broken_run.generator
    assert generator.valid + sum(generator.malformed.values()) == len(broken_run.messages)
    assert generator.valid == len(broken_run.accepted)
    seen = Counter(event.event_id for event in broken_run.accepted)
    assert sum(count - 1 for count in seen.values()) == generator.duplicates > 0
    first_copies = {event.event_id: event.type for event in broken_run.accepted}
    assert Counter(first_copies.values()) == {t: n for t, n in generator.by_type.items() if n}


def test_duplicates_are_byte_identical_resends(broken_run: Run) -> None:
    by_id: dict[str, set[bytes]] = defaultdict(set)
    for (_, value), result in zip(broken_run.messages, broken_run.results):
        if isinstance(result, EnrichedEvent):
            by_id[result.event_id].add(value)
    assert all(len(values) == 1 for values in by_id.values())


def test_counters_count_only_what_was_consumed() -> None:
    generator = TrafficGenerator(200, seed=4)
    stream = generator.events()
    taken = [next(stream) for _ in range(500)]
    assert generator.valid + sum(generator.malformed.values()) == len(taken)


def test_plan_says_how_many_visitor_ids_appear(run: Run) -> None:
    mix = run.generator.mix
    assert mix == plan(VISITORS, seed=7)
    assert len({event.visitor_id for event in run.accepted}) == mix.visitors == VISITORS
    assert mix.company_employees + mix.freemail_leads + mix.anonymous + mix.bots == mix.people
    assert mix.companies == len(COMPANIES)
    assert "company employees" in str(mix)


@settings(max_examples=25, deadline=None)
@given(visitors=st.integers(0, 40), seed=st.integers(0, 2**32))
def test_exactly_the_requested_number_of_visitors(visitors: int, seed: int) -> None:
    generator = TrafficGenerator(visitors, seed=seed, malformed_ratio=0)
    ids = {orjson.loads(value)["visitor_id"] for _, value in generator.events()}
    assert len(ids) == generator.mix.visitors == visitors


def test_bad_arguments_are_refused() -> None:
    for kwargs in ({"visitors": -1}, {"visitors": 1, "site_ids": ()}, {"visitors": 1, "malformed_ratio": 1.0},
                   {"visitors": 1, "malformed_ratio": 0.6, "duplicate_ratio": 0.5}):  # fmt: skip
        with pytest.raises(ValueError):
            TrafficGenerator(**kwargs)


# -- the events themselves ---------------------------------------------------------------------------


def test_accepted_events_are_objects_with_the_required_fields(run: Run) -> None:
    assert len(run.accepted) > 20_000
    for document in run.documents:
        assert isinstance(document["event_id"], str) and document["event_id"]
        assert document["site_id"] == "demo"
        assert document["type"] in EVENT_TYPES
        assert isinstance(document["ts"], (int, str))
        assert isinstance(document["visitor_id"], str)
        assert all(not isinstance(value, (dict, list)) for value in document.get("properties", {}).values())
    kinds = Counter(type(document["ts"]) for document in run.documents)
    assert kinds[int] > 1000 and kinds[str] > 1000  # both timestamp forms


def test_timestamps_span_several_days_from_the_start(run: Run) -> None:
    times = [event.ts_ms for event in run.accepted]
    assert DEFAULT_START_MS <= min(times) < DEFAULT_START_MS + DAY
    assert 5 * DAY < max(times) - min(times) <= 11 * DAY


def test_stream_is_in_time_order_up_to_a_few_seconds(run: Run) -> None:
    latest, worst = 0, 0
    seen: set[str] = set()
    for event in run.accepted:
        if event.event_id in seen:  # a re-send comes up to 15 s late, as retries do
            continue
        seen.add(event.event_id)
        worst = max(worst, latest - event.ts_ms)
        latest = max(latest, event.ts_ms)
    assert 0 < worst <= 5_000  # some delivery jitter, never more than a few seconds


def test_visitors_come_back_in_separate_sessions_within_five_days(run: Run) -> None:
    times: dict[str, list[int]] = defaultdict(list)
    for event in run.accepted:
        times[event.visitor_id].append(event.ts_ms)
    returning = 0
    for stamps in times.values():
        stamps.sort()
        gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
        assert not any(20 * MINUTE < gap <= 30 * MINUTE for gap in gaps)  # a gap is clearly in or between sessions
        assert stamps[-1] - stamps[0] <= 5 * DAY + 2 * 3_600_000
        returning += any(gap > 30 * MINUTE for gap in gaps)
    assert returning > VISITORS // 5


def test_every_event_type_and_channel_appears(run: Run) -> None:
    assert {event.type for event in run.accepted} == set(EVENT_TYPES)
    assert {event.channel for event in run.accepted if not event.is_bot} == set(CHANNELS)
    assert {event.click_id_type for event in run.accepted} >= {"gclid", "msclkid", "fbclid", "li_fat_id"}


def test_bots_are_flagged_and_never_identify(run: Run) -> None:
    bots = [event for event in run.accepted if event.is_bot]
    assert {event.user_agent for event in bots} == {*CRAWLER_USER_AGENTS, HEADLESS_USER_AGENT}
    assert all(event.type == "pageview" and not event.email for event in bots)
    bot_visitors = {event.visitor_id for event in bots}
    assert not any(event.email for event in run.accepted if event.visitor_id in bot_visitors)


def test_people_are_not_flagged_as_bots(run: Run) -> None:
    people = {event.visitor_id for event in run.accepted if event.type != "pageview"}
    assert not any(event.is_bot for event in run.accepted if event.visitor_id in people)
    devices = Counter(event.device for event in run.accepted if not event.is_bot)
    assert devices["desktop"] > devices["mobile"] > 1000


def test_companies_free_mail_and_throwaway_addresses_all_identify(run: Run) -> None:
    domains = Counter(event.email_domain for event in run.accepted if event.type == "form_submit")
    company_domains = {company.domain for company in COMPANIES}
    assert len({registrable_domain(domain) for domain in domains} & company_domains) >= 30
    personal = {domain for domain in domains if registrable_domain(domain) not in company_domains}
    assert {"gmail.com", "yahoo.com", "outlook.com", "hotmail.com"} <= personal
    assert personal <= {*FREE_MAIL_DOMAINS, *DISPOSABLE_DOMAINS}
    assert set(DISPOSABLE_DOMAINS) & set(domains)
    assert any(domain.startswith(("eu.", "us.")) and domain.endswith("globex.io") for domain in domains)
    forms = [document for document in run.documents if document["type"] == "form_submit"]
    assert all({"first_name", "company", "job_title"} <= document["properties"].keys() for document in forms)
    assert {"undefined", "null", "guest"} & {event.email for event in run.accepted if event.type == "identify"}


def test_email_campaigns_open_and_click_through_with_the_recipient(run: Run) -> None:
    opens = [event for event in run.accepted if event.type == "email_open"]
    clicks = [event for event in run.accepted if event.type == "email_click"]
    assert opens and clicks
    assert all(event.campaign and event.email for event in opens)
    assert all(event.campaign and "lb_email=" in event.url and event.email for event in clicks)  # email from the URL
    assert all(event.channel == "email" for event in clicks)
    assert {event.email for event in clicks} <= {event.email for event in opens}


def test_custom_events_are_named(run: Run) -> None:
    names = {event.name for event in run.accepted if event.type == "custom"}
    assert {"video_play", "scroll_depth", "pricing_calculator"} <= names


# -- addresses and the IP-range table ----------------------------------------------------------------


def test_ips_are_only_in_documentation_ranges(run: Run, broken_run: Run) -> None:
    ips = {document["ip"] for document in run.documents + broken_run.documents}
    assert any(":" in ip for ip in ips) and any("." in ip for ip in ips)
    for ip in ips:
        address = ipaddress.ip_address(ip)
        assert any(address in network for network in DOCUMENTATION_NETWORKS), ip


def test_ip_range_table_loads_and_resolves_offices_to_their_company(run: Run) -> None:
    table, bad_lines = IpRangeTable.from_lines(ip_range_table_lines())
    assert not bad_lines
    for line in ip_range_table_lines()[1:]:
        network = ipaddress.ip_network(line.split(",")[0])
        assert any(network.subnet_of(doc) for doc in DOCUMENTATION_NETWORKS if doc.version == network.version)
    company_domains = {company.domain for company in COMPANIES}
    networks = NetworkDirectory(table)
    resolved = Counter(networks.look_up(event.ip).domain for event in run.accepted if not event.is_bot)
    assert len(set(resolved) & company_domains) >= 30
    kinds = Counter(networks.look_up(event.ip).kind for event in run.accepted if not event.is_bot)
    assert kinds["hosting"] > 0  # scrapers in disguise: only their address gives them away
    assert {networks.look_up(event.ip).country for event in run.accepted if not event.is_bot} >= {"DE", "JP", "NL"}


def test_company_domains_are_registrable_business_domains() -> None:
    assert len(COMPANIES) == 40
    assert len({company.domain for company in COMPANIES}) == 40
    for company in COMPANIES:
        assert registrable_domain(company.domain) == company.domain
        assert all(registrable_domain(sub + company.domain) == company.domain for sub in company.email_subdomains)
        assert not is_personal_email_domain(company.domain)
    assert sum(company.domain.count(".") > 1 for company in COMPANIES) >= 10  # co.uk, com.au, ... suffixes


# -- formatting --------------------------------------------------------------------------------------


@given(
    ms=st.integers(0, 4_102_444_800_000),
    offset_minutes=st.sampled_from((0, 60, -300, 330, -570)),
    with_millis=st.booleans(),
)
def test_rfc3339_round_trips(ms: int, offset_minutes: int, with_millis: bool) -> None:
    text = rfc3339_writer(offset_minutes, with_millis)(ms)
    parsed_ms = round(datetime.fromisoformat(text).timestamp() * 1000)
    assert parsed_ms == (ms if with_millis else ms - ms % 1000)
    assert text.endswith("Z") == (offset_minutes == 0)


def test_traffic_mix_defaults_to_nothing() -> None:
    assert plan(0) == TrafficMix()
    assert list(TrafficGenerator(0).events()) == []
