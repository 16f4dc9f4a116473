"""The erasure and access-export API on the real stack: read-write keys only, 422 for whom it cannot name,
404 for an unknown erasure (or another site's), 202 and a status that goes from pending to done with the
rows removed per table (a row that lands while the mutations run included); the export answers the
person's rows as one JSON document."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from processors.identity import known_lead_id
from sinks.clickhouse import connect, insert_columnar
from tests.browser.board_seed import API_KEYS, KEY, OTHER_KEY, OTHER_SITE, READ_ONLY_KEY, SITE

pytestmark = pytest.mark.integration

BASE = f"/v1/sites/{SITE}"
EMAIL = "dora@initech.io"
NOW = int(time.time() * 1000)


@pytest.fixture
def api(settings):
    ch = connect(settings.clickhouse())
    lead = known_lead_id(SITE, EMAIL)
    insert_columnar(ch, "events", ("event_id", "site_id", "visitor_id", "ts_ms", "email", "lead_id", "raw_offset"),
                    [(f"e{i}", SITE, "v-dora", NOW - i, EMAIL if i == 0 else "", lead, i) for i in range(3)]
                    + [("e-other", SITE, "v-eve", NOW, "", "lead-eve", 9)])
    insert_columnar(ch, "leads", ("lead_id", "site_id", "email", "version"), [(lead, SITE, EMAIL, 1)])
    insert_columnar(ch, "visitor_leads", ("site_id", "visitor_id", "since_ts_ms", "lead_id", "version"),
                    [(SITE, "v-dora", 0, lead, 1)])
    with TestClient(create_app(replace(settings, api_keys=API_KEYS))) as client:
        client.headers["X-API-Key"] = KEY
        yield client, ch
    ch.disconnect()


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


def test_only_a_read_write_key_of_the_site_may_erase_or_export(api):
    client, _ = api
    for key in (READ_ONLY_KEY, OTHER_KEY):
        headers = {"X-API-Key": key}
        problem(client.post(f"{BASE}/erasures", json={"email": EMAIL}, headers=headers), 403)
        problem(client.get(f"{BASE}/people/{EMAIL}/export", headers=headers), 403)
        problem(client.get(f"{BASE}/erasures/er_0123456789abcdef", headers=headers), 403)
    problem(client.post(f"{BASE}/erasures", json={"email": EMAIL}, headers={"X-API-Key": ""}), 401)


def test_whom_it_cannot_name_is_a_422(api):
    client, _ = api
    for body in ({}, {"email": None}, {"email": "not an email"}, {"lead_id": "bad id!"}, {"email": EMAIL, "x": 1},
                 {"email": "x" * 400 + "@a.io"}):
        problem(client.post(f"{BASE}/erasures", json=body), 422)
    problem(client.post(f"{BASE}/erasures", content=b"{nope", headers={"content-type": "application/json"}), 400)  # malformed JSON
    problem(client.get(f"{BASE}/people/no-at-sign/export"), 422)


def test_an_unknown_erasure_or_another_sites_is_a_404(api):
    client, _ = api
    problem(client.get(f"{BASE}/erasures/er_0123456789abcdef"), 404)
    problem(client.get(f"{BASE}/erasures/{'x' * 30}"), 400)  # a malformed path is a 400 here, as everywhere
    done = client.post(f"{BASE}/erasures", json={"lead_id": "lead-nobody"})
    assert done.status_code == 202 and done.json()["status"] == "done"  # nothing in ClickHouse: nothing to wait for
    problem(client.get(f"/v1/sites/{OTHER_SITE}/erasures/{done.json()['id']}", headers={"X-API-Key": OTHER_KEY}), 404)


def test_the_export_then_the_erasure_from_pending_to_done(api):
    client, ch = api
    export = client.get(f"{BASE}/people/{EMAIL.upper()}/export")
    assert export.status_code == 200
    doc = export.json()
    assert doc["email"] == EMAIL and doc["visitors"] == ["v-dora"]
    assert sorted(e["event_id"] for e in doc["clickhouse"]["events"]) == ["e0", "e1", "e2"]
    assert [r["email"] for r in doc["clickhouse"]["leads"]] == [EMAIL]

    started = client.post(f"{BASE}/erasures", json={"email": EMAIL})
    assert started.status_code == 202
    job = started.json()
    assert job["id"].startswith("er_") and started.headers["Location"] == f"{BASE}/erasures/{job['id']}"
    assert job["counts"]["events"] == 3 and job["counts"]["leads"] == 1 and job["counts"]["visitor_leads"] == 1
    assert job["requested_by"] not in (KEY, "") and job["status"] == "pending"
    # a row of hers that a sink writes after the erasure started (produced before it): caught before done
    insert_columnar(ch, "events", ("event_id", "site_id", "visitor_id", "ts_ms", "lead_id", "raw_offset"),
                    [("e-late", SITE, "v-dora", NOW, "", 7)])
    deadline = time.monotonic() + 60
    while (status := client.get(f"{BASE}/erasures/{job['id']}").json())["status"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status["finished_ms"] >= status["requested_ms"] and status["counts"]["events"] == 4  # the late one too
    assert ch.execute("SELECT event_id FROM events") == [("e-other",)]  # another person's row stays
    assert client.get(f"{BASE}/people/{EMAIL}/export").json()["clickhouse"]["events"] == []
