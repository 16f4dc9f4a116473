"""The segments API on the real stack (Redis definitions, ClickHouse 18.16 membership): definitions written,
read, refused whole and deleted (409 while a board imports one); member counts; members pages sorted by
score and by last seen, walked by cursor; account members; the streamed CSV. Membership rows are seeded as
the sink writes them (tests/segment_seed.py)."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.browser.board_seed import API_KEYS, KEY, PIPELINE, READ_ONLY_KEY
from tests.segment_seed import (
    COMPANIES,
    COMPANIES_BY_LAST_SEEN,
    COMPANIES_BY_SCORE,
    COUNTS,
    ENGAGED,
    PRICING,
    PRICING_BY_LAST_SEEN,
    PRICING_BY_SCORE,
    SEGMENTS,
    SITE,
    last_seen_ms,
    seed_many,
    seed_members,
)
from sinks.clickhouse import connect, insert_columnar

pytestmark = pytest.mark.integration

BASE = f"/v1/sites/{SITE}"
BOARD = PIPELINE.model_dump(mode="json", exclude_unset=True)
IMPORTING_BOARD = BOARD | {"import": {"segment": "pricing-viewers"}}


def body(segment: dict) -> dict:
    return {key: value for key, value in segment.items() if key != "id"}


@pytest.fixture
def ch(settings):
    client = connect(settings.clickhouse())
    seed_members(lambda table, columns, rows: insert_columnar(client, table, columns, rows))
    return client


@pytest.fixture
def api(settings, ch):
    with TestClient(create_app(replace(settings, api_keys=API_KEYS))) as client:
        client.headers["X-API-Key"] = KEY
        for segment in SEGMENTS:
            assert client.put(f"{BASE}/segments/{segment['id']}", json=body(segment)).status_code == 200
        assert client.put(f"{BASE}/boards/pipeline", json=IMPORTING_BOARD).status_code == 200
        yield client


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


# ------------------------------------------------------------------------------------------ definitions


def test_a_segment_is_written_read_and_listed_with_its_member_count(api):
    got = api.get(f"{BASE}/segments/engaged").json()
    assert got == {"id": "engaged", "name": "Score 10+", "if": ENGAGED["if"], "version": got["version"]}
    again = api.put(f"{BASE}/segments/engaged", json=body(ENGAGED))
    assert again.json()["version"] == got["version"] and again.headers["ETag"] == f'"{got["version"]}"'
    changed = api.put(f"{BASE}/segments/engaged", json=body(ENGAGED) | {"name": "Engaged"}).json()
    assert changed["version"] > got["version"] and changed["name"] == "Engaged"
    listed = {s["id"]: s for s in api.get(f"{BASE}/segments").json()["segments"]}
    assert {sid: s["members"] for sid, s in listed.items()} == COUNTS
    assert listed["pricing-viewers"]["imported_by"] == ["pipeline"] and listed["engaged"]["imported_by"] == []
    assert (listed["active-companies"]["of"], listed["pricing-viewers"]["conditions"]) == ("account", 1)


def test_a_bad_segment_is_refused_whole_with_one_line_per_problem(api):
    bad = {"name": "Bad", "if": [
        {"count": {"event": "pageview", "url": "*/pricing*"}, "within": "400d", "op": "gt", "value": 1},
        {"field": "lead.scor", "op": "gt", "value": 1}]}
    refused = problem(api.put(f"{BASE}/segments/bad", json=bad), 422)
    assert len(refused["problems"]) == 2
    assert refused["problems"][0].startswith("if.0: within: at most 366d")
    assert "unknown field 'lead.scor'" in refused["problems"][1]
    too_big = {"name": "Big", "if": [{"any": [{"field": "lead.score", "op": "gt", "value": n} for n in range(50)]},
                                     {"any": [{"field": "lead.score", "op": "lt", "value": n} for n in range(50)]}]}
    assert "a segment has at most 100" in problem(api.put(f"{BASE}/segments/big", json=too_big), 422)["detail"]
    unknown = {"name": "U", "if": [{"in_segment": "nope"}]}
    assert problem(api.put(f"{BASE}/segments/u", json=unknown), 422)["problems"] == [
        "segment u: if[0].in_segment: no segment 'nope'"]
    misplaced = {"name": "M", "of": "account", "if": [{"field": "lead.score", "op": "gt", "value": 1}]}
    assert "is a lead field" in problem(api.put(f"{BASE}/segments/m", json=misplaced), 422)["detail"]
    assert api.put(f"{BASE}/segments/a", json={"name": "A", "if": [{"in_segment": "engaged"}]}).status_code == 200
    cycle = problem(api.put(f"{BASE}/segments/engaged", json={"name": "E", "if": [{"in_segment": "a"}]}), 422)
    assert any("cycle" in line for line in cycle["problems"])
    mismatch = problem(api.put(f"{BASE}/segments/x", json={"id": "y", "name": "X"}), 422)
    assert "does not match the path" in mismatch["detail"]
    for segment_id in ("bad", "big", "u", "m", "x"):  # nothing applied
        assert problem(api.get(f"{BASE}/segments/{segment_id}"), 404)["title"] == "no such segment"
    assert api.get(f"{BASE}/segments/engaged").json()["if"] == ENGAGED["if"]


def test_deleting_a_segment_a_board_imports_is_refused_until_it_stops(api):
    refused = problem(api.delete(f"{BASE}/segments/pricing-viewers"), 409)
    assert refused["code"] == "in_use"
    assert refused["problems"] == ["segment 'pricing-viewers' is in use: board pipeline: import.segment: "
                                   "no segment 'pricing-viewers'"]
    assert api.get(f"{BASE}/segments/pricing-viewers").status_code == 200
    assert api.put(f"{BASE}/boards/pipeline", json=BOARD).status_code == 200
    assert api.delete(f"{BASE}/segments/pricing-viewers").status_code == 204
    assert problem(api.get(f"{BASE}/segments/pricing-viewers"), 404)["title"] == "no such segment"
    assert problem(api.delete(f"{BASE}/segments/pricing-viewers"), 404)["title"] == "no such segment"
    assert problem(api.get(f"{BASE}/segments/pricing-viewers/members"), 404)["title"] == "no such segment"


def test_a_read_only_key_reads_segments_and_changes_none(api):
    read_only = {"X-API-Key": READ_ONLY_KEY}
    assert api.get(f"{BASE}/segments", headers=read_only).status_code == 200
    assert api.get(f"{BASE}/segments/engaged/members", headers=read_only).status_code == 200
    assert problem(api.put(f"{BASE}/segments/engaged", json=body(ENGAGED), headers=read_only), 403)
    assert problem(api.delete(f"{BASE}/segments/engaged", headers=read_only), 403)
    assert problem(api.get(f"{BASE}/segments", headers={"X-API-Key": "nope"}), 403)


# ------------------------------------------------------------------------------------------ members


def walk(api: TestClient, segment_id: str, sort: str, limit: int) -> tuple[list[dict], list[dict]]:
    """Every page of the list; (members, pages)."""
    members, pages, cursor = [], [], None
    while True:
        params = {"sort": sort, "limit": limit} | ({"cursor": cursor} if cursor else {})
        page = api.get(f"{BASE}/segments/{segment_id}/members", params=params).json()
        pages.append(page)
        members += page["members"]
        cursor = page["next_cursor"]
        if cursor is None:
            return members, pages


def test_lead_members_are_sorted_paged_and_only_leads(api):
    members, pages = walk(api, "pricing-viewers", "score", 2)
    assert [m["lead_id"] for m in members] == PRICING_BY_SCORE
    assert [len(p["members"]) for p in pages] == [2, 1] and {p["count"] for p in pages} == {3}
    ann, bob, anon = members
    assert ann == {"lead_id": "lead-ann", "name": "ann@acme.com", "email": "ann@acme.com", "known": True,
                   "account_domain": "acme.com", "score": 40, "tags": ["Consideration"],
                   "last_seen_ms": last_seen_ms("lead-ann"), "first_channel": "referral", "last_channel": "email"}
    assert (anon["name"], anon["known"], anon["first_channel"]) == ("Anonymous lead d-anon", False, "")
    assert bob["tags"] == ["Consideration", "Decision"]
    by_last_seen, _ = walk(api, "pricing-viewers", "last_seen", 1)
    assert [m["lead_id"] for m in by_last_seen] == PRICING_BY_LAST_SEEN


def test_account_members_show_their_company_and_leads(api):
    members, _ = walk(api, "active-companies", "score", 50)
    assert members == [
        {"domain": "acme.com", "company_name": "Acme Corporation", "leads": 2, "score": 40,
         "last_seen_ms": last_seen_ms("lead-anon")},
        {"domain": "globex.com", "company_name": "Globex", "leads": 1, "score": 40,
         "last_seen_ms": last_seen_ms("lead-bob")},
    ]
    assert [m["domain"] for m in members] == COMPANIES_BY_SCORE
    assert [m["domain"] for m in walk(api, "active-companies", "last_seen", 1)[0]] == COMPANIES_BY_LAST_SEEN


def test_bad_list_requests_are_4xx(api):
    first = api.get(f"{BASE}/segments/pricing-viewers/members", params={"limit": 1}).json()
    by_score_cursor = first["next_cursor"]
    wrong_sort = api.get(f"{BASE}/segments/pricing-viewers/members",
                         params={"sort": "last_seen", "cursor": by_score_cursor})
    assert "sorted by score" in problem(wrong_sort, 400)["detail"]
    assert problem(api.get(f"{BASE}/segments/pricing-viewers/members", params={"cursor": "AAAA"}), 400)
    for params in ({"limit": 501}, {"limit": 0}, {"sort": "name"}, {"cursor": "not a cursor!"}):
        problem(api.get(f"{BASE}/segments/pricing-viewers/members", params=params), 400)
    assert problem(api.get(f"{BASE}/segments/no-such/members.csv"), 404)["title"] == "no such segment"
    assert problem(api.get(f"{BASE}/segments/NOT_AN_ID/members"), 404)["title"] == "no such segment"


def test_members_csv_streams_every_member_page_by_page(api, ch):
    everyone = seed_many(lambda table, columns, rows: insert_columnar(ch, table, columns, rows), "everyone", 4_321)
    assert api.put(f"{BASE}/segments/everyone", json={"name": "Everyone"}).status_code == 200
    with api.stream("GET", f"{BASE}/segments/everyone/members.csv") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert response.headers["content-disposition"] == 'attachment; filename="segment-everyone.csv"'
        chunks = list(response.iter_text())
    rows = list(csv.reader(io.StringIO("".join(chunks))))
    assert rows[0] == ["lead_id", "name", "email", "known", "account", "score", "tags", "last_seen",
                       "first_channel", "last_channel"]
    assert [row[0] for row in rows[1:]] == everyone  # all of them (three pages), in the list's order, once each
    assert api.get(f"{BASE}/segments/everyone/members", params={"limit": 1}).json()["count"] == 4_321

    pricing = list(csv.reader(io.StringIO(api.get(f"{BASE}/segments/pricing-viewers/members.csv",
                                                  params={"sort": "last_seen"}).text)))
    assert [row[0] for row in pricing[1:]] == PRICING_BY_LAST_SEEN
    anon = pricing[2]
    assert (anon[1], anon[3], anon[6]) == ("Anonymous lead d-anon", "false", "'=SUM(A1)")  # no formula runs
    assert anon[7].endswith("Z") and anon[7][:2] == "20"
    accounts = list(csv.reader(io.StringIO(api.get(f"{BASE}/segments/{COMPANIES['id']}/members.csv").text)))
    assert accounts[0] == ["domain", "company_name", "leads", "score", "last_seen"]
    assert [row[:4] for row in accounts[1:]] == [["acme.com", "Acme Corporation", "2", "40"],
                                                 ["globex.com", "Globex", "1", "40"]]


def test_a_segment_without_members_has_an_empty_list(api):
    assert api.put(f"{BASE}/segments/nobody", json={"name": "Nobody", "if": [PRICING["if"][0]]}).status_code == 200
    page = api.get(f"{BASE}/segments/nobody/members").json()
    assert (page["members"], page["count"], page["next_cursor"], page["of"]) == ([], 0, None, "lead")
    assert api.get(f"{BASE}/segments/nobody/members.csv").text.count("\r\n") == 1  # the header alone


def test_the_segment_operations_are_in_the_openapi_schema(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert set(paths[f"/v1/sites/{{site_id}}/segments/{{segment_id}}"]) == {"get", "put", "delete"}
    assert "409" in paths["/v1/sites/{site_id}/segments/{segment_id}"]["delete"]["responses"]
    members = paths["/v1/sites/{site_id}/segments/{segment_id}/members"]["get"]
    assert {p["name"] for p in members["parameters"]} >= {"sort", "limit", "cursor"}
    assert "text/csv" in paths["/v1/sites/{site_id}/segments/{segment_id}/members.csv"]["get"]["responses"]["200"]["content"]
    assert "get" in paths["/v1/sites/{site_id}/segments"]
