"""The read API on the real ClickHouse: site-scoped keys, problem+json errors, lead profile, outage = 503."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from api.analytics import Analytics
from api.app import create_app
from api.lead_profile import account_panel
from api.problems import Problem
from schemas.settings import ApiKeyEntry, Settings
from sinks.clickhouse import connect, insert_columnar
from sinks.table_sink import TABLES
from tests.api_keys import api_key

ACME, OTHER = api_key("acme"), api_key("other")

pytestmark = pytest.mark.integration


@pytest.fixture
def client(settings):
    ch = connect(settings.clickhouse())
    insert_columnar(ch, "leads", TABLES["leads"].columns, [
        ["lead_1", "acme", "ann@acme.com", ["v1"], "acme.com", "", 1000, 2000, "e1", 1, 1],
        ["lead_2", "acme", "", ["v2"], "", "", 1000, 3000, "e2", 1, 1],  # a visitor: neither known nor of an account
        ["lead_3", "acme", "", ["v3"], "initech.com", "", 1000, 2500, "e3", 1, 1],  # an anonymous employee
    ])
    insert_columnar(ch, "events", ("event_id", "site_id", "type", "ts_ms", "visitor_id", "is_bot"),
                    [[f"e{v}", "acme", "pageview", 1000, f"v{v}", 0] for v in (1, 2, 3)]
                    + [["e-bot", "acme", "pageview", 1000, "v-bot", 1]])
    insert_columnar(ch, "visitor_leads", TABLES["visitor_leads"].columns,
                    [["acme", f"v{n}", 0, f"lead_{n}", 1] for n in (1, 2, 3)])
    insert_columnar(ch, "sessions", ("session_id", "site_id", "visitor_id", "start_ms", "channel", "version"),
                    [[f"s{n}", "acme", f"v{n}", 1000, channel, 1] for n, channel in ((1, "email"), (2, "paid"),
                                                                                     (3, "organic"))])
    return TestClient(create_app(replace(settings, api_keys=f"acme:{ACME},other:{OTHER}")))


def test_keys_are_scoped_to_one_site(client):
    assert client.get("/v1/sites/acme/summary").status_code == 401
    forbidden = client.get("/v1/sites/acme/summary", headers={"X-API-Key": OTHER})
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"].startswith("application/problem+json")
    assert forbidden.json()["title"] == "this API key is not for this site"
    ok = client.get("/v1/sites/acme/summary", headers={"X-API-Key": ACME})
    assert ok.status_code == 200
    assert ok.json()["leads"] == [["visitors", 3], ["leads", 2], ["known", 1], ["anonymous, with an account", 1],
                                  ["visitors who are not leads", 1]]


def test_bad_input_is_4xx_with_a_problem_body(client):
    assert client.get("/v1/sites/ac me!/summary", headers={"X-API-Key": ACME}).status_code == 400
    bad_page = client.get("/v1/sites/acme/leads/lead_1?page=-3", headers={"X-API-Key": ACME})
    assert bad_page.status_code == 400 and "page" in bad_page.json()["detail"]
    missing = client.get("/v1/sites/acme/leads/nope", headers={"X-API-Key": ACME})
    assert missing.status_code == 404 and missing.json()["title"] == "no such lead"


def test_recent_leads_and_profile(client):
    leads = client.get("/v1/sites/acme/leads", headers={"X-API-Key": ACME}).json()
    assert [(lead["lead_id"], lead["email"], lead["known"]) for lead in leads] == [
        ("lead_3", "", False), ("lead_1", "ann@acme.com", True)]  # leads only: lead_2 is a visitor
    by_channel = client.get("/v1/sites/acme/leads-by-channel", headers={"X-API-Key": ACME}).json()
    assert by_channel == {"email": 1, "organic": 1}  # not lead_2's paid session
    profile = client.get("/v1/sites/acme/leads/lead_1", headers={"X-API-Key": ACME}).json()
    assert profile["identity"]["email"] == "ann@acme.com"
    assert profile["account"]["domain"] == "acme.com"
    assert client.get("/", headers={}).status_code == 200


def test_database_outage_is_503_not_500(settings):
    down = TestClient(create_app(replace(settings, clickhouse_port=1, api_keys=f"acme:{ACME}")))
    response = down.get("/v1/sites/acme/summary", headers={"X-API-Key": ACME})
    assert response.status_code == 503
    assert response.json()["title"] == "analytics store unavailable"


def test_api_key_config_is_validated():
    assert Settings(api_keys="a:1, b:2").api_key_entries() == [ApiKeyEntry("a", "1"), ApiKeyEntry("b", "2")]
    with pytest.raises(ValueError):
        Settings(api_keys="justakey").api_key_entries()


def test_every_query_carries_the_apis_limits(settings):
    tiny = TestClient(create_app(replace(settings, api_keys=f"acme:{ACME}", api_query_max_memory_bytes=1000)))
    refused = tiny.get("/v1/sites/acme/summary", headers={"X-API-Key": ACME})
    assert refused.status_code == 503 and refused.json()["title"] == "analytics query over its limits"
    slow = "SELECT count() FROM (SELECT number FROM system.numbers LIMIT 20000000000) WHERE sipHash64(number) = 1"
    analytics = Analytics(replace(settings, api_query_max_seconds=1))
    started = time.monotonic()
    with pytest.raises(Problem) as stopped:
        asyncio.run(analytics.read(lambda client: client.execute(slow)))
    assert stopped.value.title == "analytics query over its limits" and time.monotonic() - started < 10


def test_an_accounts_lists_are_limited_and_its_counts_are_not(settings):
    ch = connect(settings.clickhouse())
    insert_columnar(ch, "leads", TABLES["leads"].columns, [
        [f"lead_{i}", "acme", f"p{i}@globex.com" if i % 2 else "", [f"vg{i}"], "globex.com", "", 1000, 2000 + i,
         f"e{i}", 1, 1] for i in range(5)])
    api = TestClient(create_app(replace(settings, api_keys=f"acme:{ACME}", api_max_account_leads=3)))
    leads = api.get("/v1/sites/acme/accounts/globex.com/leads", headers={"X-API-Key": ACME}).json()
    assert [lead["lead_id"] for lead in leads] == ["lead_4", "lead_3", "lead_2"]  # the most recently active
    assert len(api.get("/v1/sites/acme/accounts/globex.com/leads?limit=1", headers={"X-API-Key": ACME}).json()) == 1
    panel = account_panel(ch, "acme", "globex.com", max_leads=3)
    assert [lead.lead_id for lead in panel.leads] == ["lead_4", "lead_3", "lead_2"]
    assert (panel.account.known_leads, panel.account.anonymous_leads, panel.account.last_seen_ms) == (2, 3, 2004)


def test_without_a_configured_server_secret_every_api_process_shares_one_generated_in_redis(settings):
    unset = replace(settings, server_secret="", api_keys=f"acme:{ACME}")
    first, second = create_app(unset), create_app(unset)
    keys = [app.state.services.keys for app in (first, second)]
    assert keys[0].key_id(ACME) == keys[1].key_id(ACME)  # the same actor names, whichever process records them
    configured = create_app(replace(unset, server_secret=api_key("a configured secret") * 2))
    assert configured.state.services.keys.key_id(ACME) != keys[0].key_id(ACME)
