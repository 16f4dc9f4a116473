"""Geo and network look-ups and company cards on the real stack: the CLI loads, a running worker picks them up
within about a second, the enrichment provider answers from a stand-in server on 127.0.0.1, rules read
`geo.*` and `account.*`, ClickHouse and the board API show the result."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from api.app import create_app
from leadstream.admin import load_companies, publish_ip_table
from leadstream.runner import Role, produce, start_workers, wait_for
from processors.companies import CompanyStore, queue_wanted
from processors.company_resolver import NEGATIVE_TTL_S, CompanyResolver, HttpJsonProvider
from processors.lookup_tables import LookupTables
from processors.definitions_store import DefinitionsStore
from processors.runtime.writes import RedisWrites
from schemas.definitions import load_definitions
from sinks.clickhouse import connect

from tests.api_keys import api_key

pytestmark = pytest.mark.integration

BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
COMPANIES_CSV = ("domain,name,industry,employees,country,website\n"
                 "acme.com,Acme,Software,51-200,NL,https://acme.com/\n"
                 "globex.io,Globex,Logistics,1001-5000,US,https://globex.io/\n"
                 "gmail.com,Google Mail,,,,\n")
DEFINITIONS = """
rules:
- id: dutch-software
  when: {event: pageview}
  if:
  - {field: geo.country, op: is, value: NL}
  - {field: account.industry, op: is, value: Software}
  - {field: account.employees, op: gt, value: 50}
  then: [{add_tag: Dutch software}]
- id: from-a-business-network
  when: {event: pageview}
  if: [{field: network.kind, op: is, value: business}]
  once: per_event
  then: [{add_score: 1}]
boards:
- id: pipeline
  name: Pipeline
  card: account
  stages:
  - {id: new, name: New, entry: true}
  - {id: dutch, name: Dutch software, when_tag: Dutch software}
"""


class StandInProvider(ThreadingHTTPServer):
    """An enrichment service on 127.0.0.1: GET /companies/<domain>. Knows `cards`; answers `garbage` with
    what is no card, `slow` after `delay_s`, domains starting with "down" with HTTP 500; everything else is
    404. Records every domain asked about."""

    def __init__(self, cards: dict[str, dict], garbage: frozenset[str] = frozenset(),
                 slow: frozenset[str] = frozenset(), delay_s: float = 1.0):
        self.asked: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
                domain = self.path.rsplit("/", 1)[-1]
                server.asked.append(domain)
                if domain in slow:
                    time.sleep(delay_s)
                if domain.startswith("down"):
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif domain in cards or domain in garbage:
                    body = orjson.dumps(cards[domain]) if domain in cards else b"<html>rate limited</html>"
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/companies/{{domain}}"


@pytest.fixture
def provider():
    server = StandInProvider({"newco.io": {"name": "NewCo", "industry": "Robotics", "employees": "11-50",
                                                "country": "DE", "linkedin_url": "https://linkedin.com/company/newco",
                                                "ranking": 7}},
                             garbage=frozenset({"garbage-co.io"}), slow=frozenset({"slow-co.io"}))
    yield server
    server.shutdown()


def raw(i: int, visitor: str, ip: str, kind: str = "pageview", **extra) -> tuple[bytes, bytes]:
    event = {"event_id": f"e{i}", "site_id": "it", "type": kind, "visitor_id": visitor, "ts": int(time.time() * 1000),
             "url": "https://example.com/pricing", "ip": ip, "user_agent": BROWSER, **extra}
    return visitor.encode(), orjson.dumps(event)


async def _apply(settings) -> None:
    redis = aioredis.from_url(settings.redis_url)
    try:
        await DefinitionsStore(redis, settings.name("ls")).apply("it", load_definitions(DEFINITIONS, "geo.yaml"))
    finally:
        await redis.aclose()


@pytest.mark.slow
def test_tables_loaded_while_a_worker_runs_reach_it_within_a_second(settings, roles, provider, tmp_path, capsys):
    asyncio.run(_apply(settings))
    roles += [*start_workers(settings, "worker", "single", env={"LEADSTREAM_COMPANY_PROVIDER_URL": provider.url}),
              Role(settings, "sink", "sink").start()]
    asyncio.run(produce(settings, [raw(0, "warm-up", "10.0.0.1")]))
    wait_for(settings, "SELECT count() FROM events", 1, 120, roles)  # the worker runs, with empty tables

    assert publish_ip_table(settings, "cidr,domain,company_name,kind,country,region,city,asn\n"
                                      "198.51.100.0/29,acme.com,Acme,company,NL,North Holland,Amsterdam,AS64500") == 0
    (tmp_path / "companies.csv").write_text(COMPANIES_CSV)
    assert load_companies(settings, str(tmp_path / "companies.csv")) == 0
    out = capsys.readouterr().out
    assert "line 4: domain 'gmail.com' refused" in out and "2 new, 0 changed, 0 unchanged; 1 rows refused" in out
    time.sleep(1.5)  # "within about a second": the worker polls the tables' versions every second
    asyncio.run(produce(settings, [
        raw(1, "office", "198.51.100.3"),  # Acme's office: the operator's table names it
        raw(2, "google", "8.8.8.8"),  # a public address: the package's data
        raw(3, "scraper", "52.95.110.1"),  # a cloud provider: a bot, whatever its user agent
        raw(4, "newbie", "192.0.2.9", "identify", email="ann@newco.io"),  # no card: the provider is asked
    ]))
    wait_for(settings, "SELECT count() FROM events", 5, 60, roles)
    ch = connect(settings.clickhouse())
    rows = dict((row[0], row[1:]) for row in ch.execute(
        "SELECT visitor_id, geo_country, geo_region, geo_city, network_asn, network_org, network_kind, network_domain,"
        " is_bot FROM events"))
    assert rows["office"] == ("NL", "North Holland", "Amsterdam", 64500, "Acme", "business", "acme.com", 0)
    assert rows["google"] == ("US", "", "", 0, "GOOGLE", "business", "", 0)
    assert rows["scraper"][0] == "US" and rows["scraper"][5:] == ("hosting", "", 1)
    assert rows["warm-up"] == ("", "", "", 0, "", "", "", 0)

    wait_for(settings, "SELECT count() FROM rule_executions FINAL WHERE rule_id = 'dutch-software'", 1, 60, roles)
    assert ch.execute("SELECT account_domain, reason FROM identity_events FINAL WHERE kind = 'account_linked'"
                      " AND visitor_id = 'office'") == [("acme.com", "ip_range")]
    assert ch.execute("SELECT count() FROM identity_events FINAL WHERE visitor_id = 'scraper'") == [(0,)]
    wait_for(settings, "SELECT count() FROM companies FINAL", 3, 60, roles)  # two from the file, one provided
    assert sorted(ch.execute("SELECT domain, name, industry, employees, employees_min, country, source"
                             " FROM companies FINAL")) == [
        ("acme.com", "Acme", "Software", "51-200", 51, "NL", "file"),
        ("globex.io", "Globex", "Logistics", "1001-5000", 1001, "US", "file"),
        ("newco.io", "NewCo", "Robotics", "11-50", 11, "DE", "provider:127.0.0.1")]
    assert provider.asked == ["newco.io"]

    client = TestClient(create_app(replace(settings, api_keys=f"it:{api_key('it')}")))
    with client:
        key = {"X-API-Key": api_key("it")}
        panel = client.get("/v1/sites/it/boards/pipeline/cards/account:acme.com", headers=key)
        assert panel.status_code == 200, panel.text
        account = panel.json()["account"]
        assert account["company_name"] == "Acme" and account["company"]["industry"] == "Software"
        assert account["company"]["employees_min"] == 51 and account["company"]["country"] == "NL"
        added = client.post("/v1/sites/it/boards/pipeline/cards", json={"domain": "https://www.globex.io/"},
                            headers=key)
        assert added.status_code in (200, 202) and added.json()["command_id"]
        wait_for(settings, "SELECT count() FROM stage_changes FINAL WHERE card_id = 'account:globex.io'", 1, 60, roles)
        board = client.get("/v1/sites/it/boards/pipeline", headers=key).json()
        titles = {card["card_id"]: card["title"] for stage in board["stages"] for card in stage["cards"]}
        assert titles["account:globex.io"] == "Globex"  # named from its company card


async def _resolve_all(settings, provider_url: str, domains: list[str], timeout_s: float = 0.3) -> list[str]:
    redis = aioredis.from_url(settings.redis_url)
    prefix = settings.name("ls")
    tables = LookupTables()
    provider = HttpJsonProvider(provider_url, timeout_s=timeout_s)
    store = CompanyStore(redis, prefix)
    resolver = CompanyResolver(redis, prefix, provider, 6000, store.publish, tables.companies)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            queue_wanted(RedisWrites(pipe), prefix, domains, 0)
            await pipe.execute()
        await tables.refresh(redis, prefix)  # as a worker's tables are, every second
        outcomes = []
        for domain in sorted(await resolver.claim(limit=100)):
            outcomes.append(await resolver.resolve(domain))
        await tables.refresh(redis, prefix)
        outcomes.append(tables.companies.get("newco.io"))
        outcomes.append(await redis.ttl(store.miss_key("unknown-co.io")))
        outcomes.append(await redis.zcard(store.wanted_key))
        return outcomes
    finally:
        await provider.close()
        await redis.aclose()


def test_the_provider_fills_cards_caches_negative_answers_and_a_breaker_guards_it(settings, provider):
    garbage, found, slow, unknown, card, miss_ttl, queued = asyncio.run(_resolve_all(
        settings, provider.url, ["newco.io", "unknown-co.io", "garbage-co.io", "slow-co.io"]))  # asked in name order
    assert (found, garbage, slow, unknown) == ("found", "failed", "failed", "unknown")
    assert card is not None and (card.name, card.source) == ("NewCo", "provider:127.0.0.1")
    assert NEGATIVE_TTL_S - 60 < miss_ttl <= NEGATIVE_TTL_S and queued == 0
    asked = len(provider.asked)
    again = asyncio.run(_resolve_all(settings, provider.url, ["newco.io", "unknown-co.io", "garbage-co.io"]))
    assert again[:3] == ["skipped"] * 3 and len(provider.asked) == asked  # cached: nobody is asked again

    failing = [f"down{i}.io" for i in range(7)]
    outcomes = asyncio.run(_resolve_failing(settings, provider.url, failing))
    assert outcomes == ["failed"] * 5 + ["deferred"] * 2  # five failures open the breaker
    assert sum(domain.startswith("down") for domain in provider.asked) == 5


async def _resolve_failing(settings, provider_url: str, domains: list[str]) -> list[str]:
    """Every look-up fails (HTTP 500); after five failures the breaker keeps the rest queued."""
    redis = aioredis.from_url(settings.redis_url)
    prefix = settings.name("ls")
    provider = HttpJsonProvider(provider_url, timeout_s=0.3)
    resolver = CompanyResolver(redis, prefix, provider, 6000, CompanyStore(redis, prefix).publish,
                               LookupTables().companies)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            queue_wanted(RedisWrites(pipe), prefix, domains, 0)
            await pipe.execute()
        outcomes = [await resolver.resolve(domain) for domain in sorted(await resolver.claim(limit=100))]
        assert await redis.zcard(resolver.store.wanted_key) == 2  # the deferred ones wait in the queue
        return outcomes
    finally:
        await provider.close()
        await redis.aclose()
