"""The API's answers when a key is misplaced or a store is down, on the real app with nothing listening
behind it (ClickHouse and Redis on a closed port): a key is taken from the X-API-Key header only, and a
503 names what is unavailable and a request id, never the exception behind it (that goes to the log)."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from schemas.settings import Settings
from tests.api_keys import SERVER_SECRET, api_key

KEY = {"X-API-Key": api_key("acme")}
CLOSED = replace(Settings(), clickhouse_port=1, redis_url="redis://127.0.0.1:1/0", server_secret=SERVER_SECRET,
                 api_keys=f"acme:{api_key('acme')},globex:{api_key('globex')}")
INTERNALS = re.compile(r"Error|Exception|Traceback|clickhouse|redis|refused|errno|127\.0\.0\.1", re.IGNORECASE)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(CLOSED)) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/sites/acme/summary", "/v1/sites/acme/boards", "/v1/sites/acme/rules"])
def test_a_key_in_the_query_string_is_refused_even_with_the_header(client, path):
    for headers in ({}, KEY):
        response = client.get(path, params={"key": api_key("acme")}, headers=headers)
        assert response.status_code == 401
        body = response.json()
        assert body["title"] == "API key in the URL" and "X-API-Key header" in body["detail"]


@pytest.mark.parametrize(("path", "title"), [
    ("/v1/sites/acme/summary", "analytics store unavailable"),
    ("/v1/sites/acme/leads/lead-1", "analytics store unavailable"),
    ("/v1/sites/acme/boards", "board store unavailable"),
    ("/v1/sites/acme/rules/hot-lead", "board store unavailable"),
])
def test_an_outage_is_a_503_naming_no_internals_and_logging_the_cause(client, caplog, path, title):
    with caplog.at_level(logging.ERROR, logger="api.problems"):
        response = client.get(path, headers=KEY)
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert (body["title"], body["code"]) == (title, "unavailable")
    assert re.fullmatch(r"[0-9a-f]{16}", body["request_id"]) and body["request_id"] in body["detail"]
    assert not INTERNALS.search(response.text), response.text
    [record] = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert record.exc_info is not None  # the cause, with its traceback, is in the server log


def test_another_sites_key_is_refused_before_any_store_is_asked(client):
    response = client.get("/v1/sites/acme/summary", headers={"X-API-Key": api_key("globex")})
    assert response.status_code == 403


def test_a_bug_is_a_500_with_a_request_id_and_the_traceback_only_in_the_log(caplog):
    app = create_app(CLOSED)

    @app.get("/bug")
    def bug() -> None:
        raise KeyError("secret internals")

    with caplog.at_level(logging.ERROR, logger="api.problems"):
        response = TestClient(app, raise_server_exceptions=False).get("/bug")
    assert response.status_code == 500
    body = response.json()
    assert body["title"] == "internal error"
    assert "KeyError" not in response.text and "secret internals" not in response.text
    [record] = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert "secret internals" in record.getMessage()
