"""The API's own defences, on the real app with no store behind it (nothing here needs a server): the key is
checked before a request body is read, bodies are bounded, every answer carries the security headers, the
pages build their DOM without HTML strings, weak secrets stop the API (and the other roles) from starting,
key ids are keyed by the server secret, read-only keys see no webhook URL, and open streams are limited."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.keys import ApiKeys
from api.routes.rules import REDACTED, rule_json
from api.streams import StreamSlots
from leadstream.cli import main
from schemas.rules import Rule
from schemas.settings import Settings, WeakSecret
from tests.api_keys import SERVER_SECRET, api_key

ACME, ACME_RO, GLOBEX = api_key("acme"), api_key("acme-ro"), api_key("globex")
SETTINGS = replace(Settings(), clickhouse_port=1, redis_url="redis://127.0.0.1:1/0", server_secret=SERVER_SECRET,
                   api_keys=f"acme:{ACME},acme:{ACME_RO}:ro,globex:{GLOBEX}", api_max_body_bytes=1024)
STATIC = Path(__file__).resolve().parents[1] / "api" / "static"
RULE = {"when": {"event": "pageview"}, "then": [{"add_score": 5}]}


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(SETTINGS), raise_server_exceptions=False)


# ------------------------------------------------------------------------------------------ the body


def call(app, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bool]:
    """Drive the app by ASGI directly: (status, whether the app asked for the body)."""
    asked: list[bool] = []

    async def receive():
        asked.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": raw + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), bool(asked)


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401), ({"X-API-Key": GLOBEX}, 403), ({"X-API-Key": ACME_RO}, 403), ({"X-API-Key": "x" * 40}, 403)])
def test_the_key_is_checked_before_the_body_is_read(headers, status):
    app = create_app(SETTINGS)
    for path in ("/v1/sites/acme/rules/r1", "/v1/sites/acme/boards/pipeline"):
        assert call(app, "PUT", path, headers, b'{"when": {"event": "pageview"}}') == (status, False)
    assert call(app, "POST", "/v1/sites/acme/boards/pipeline/cards/account:a.com/notes", headers,
                b'{"text": "hi"}') == (status, False)
    # with a key that may write, the body is read (and then the stores, not started here, are a 503)
    assert call(app, "PUT", "/v1/sites/acme/rules/r1", {"X-API-Key": ACME}, b"{}") == (503, True)


def test_a_body_over_the_limit_is_a_413_whether_or_not_it_says_its_length(client):
    big = b'{"description": "' + b"x" * 2000 + b'"}'
    for content in (big, iter([big[:1000], big[1000:]])):  # Content-Length, then chunked
        answer = client.put("/v1/sites/acme/rules/r1", content=content,
                            headers={"X-API-Key": ACME, "Content-Type": "application/json"})
        assert answer.status_code == 413, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert (answer.json()["code"], answer.json()["detail"]) == ("body_too_large", "at most 1024 bytes")
    other_key = client.put("/v1/sites/acme/rules/r1", content=big, headers={"X-API-Key": GLOBEX})
    assert other_key.status_code == 403  # the key first: a stranger learns nothing about the limit


# ------------------------------------------------------------------------------------------ headers and pages


def test_every_answer_carries_the_security_headers():
    app = create_app(SETTINGS)

    @app.get("/bug")
    def bug() -> None:
        raise KeyError("internals")

    client = TestClient(app, raise_server_exceptions=False)
    answers = {path: client.get(path) for path in ("/health", "/", "/board", "/static/board.js", "/static/nope",
                                                   "/nowhere", "/v1/sites/acme/boards", "/openapi.json", "/bug")}
    answers["PUT 413"] = client.put("/v1/sites/acme/rules/r1", content=b"x" * 2000, headers={"X-API-Key": ACME})
    assert {path: answer.status_code for path, answer in answers.items()} == {
        "/health": 200, "/": 200, "/board": 200, "/static/board.js": 200, "/static/nope": 404, "/nowhere": 404,
        "/v1/sites/acme/boards": 401, "/openapi.json": 200, "/bug": 500, "PUT 413": 413}
    for path, answer in answers.items():
        policy = answer.headers.get("content-security-policy", "")
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["referrer-policy"] == "no-referrer", path
    assert client.get("/docs").status_code == 404  # it would load scripts from a CDN onto this origin


def test_the_pages_make_their_dom_from_nodes_and_load_only_their_own_files():
    for page in STATIC.glob("*.html"):
        html = page.read_text()
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], page.name  # no inline script
        assert not re.search(r"<style|<[^>]*\s(?:style|on[a-z]+)\s*=", html), page.name  # no inline style or handler
        assert re.findall(r'(?:src|href)="(?!/static/)', html) == [], page.name
    for script in STATIC.glob("*.js"):
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", script.read_text(), flags=re.S)  # comments may name them
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", code), \
            script.name


# ------------------------------------------------------------------------------------------ secrets and key ids


@pytest.mark.parametrize(("changes", "named"), [
    ({"server_secret": "change-me"}, "LEADSTREAM_SERVER_SECRET: the secret is a placeholder"),
    ({"server_secret": "a1b2c3d4e5f6"}, "LEADSTREAM_SERVER_SECRET: the secret is shorter than 32 characters"),
    ({"api_keys": "acme:change-me"}, "LEADSTREAM_API_KEYS: the key of entry 1 (site 'acme') is a placeholder"),
    ({"api_keys": f"acme:{ACME},globex:k-globex"},
     "LEADSTREAM_API_KEYS: the key of entry 2 (site 'globex') is shorter than 16 characters"),
    ({"api_keys": "acme:" + "Change_Me" * 4}, "LEADSTREAM_API_KEYS: the key of entry 1 (site 'acme') is a placeholder"),
    ({"clickhouse_password": "change-me"}, "LEADSTREAM_CLICKHOUSE_PASSWORD: its password is a placeholder"),
    ({"redis_url": "redis://:changeme@redis:6379/0"}, "LEADSTREAM_REDIS_URL: its password is a placeholder"),
    ({"kafka_sasl_password": "hunter2"}, "LEADSTREAM_KAFKA_SASL_PASSWORD: its password is shorter than 16"),
])
def test_the_api_refuses_to_start_with_a_weak_secret_naming_the_setting_not_the_value(changes, named):
    with pytest.raises(WeakSecret) as refused:
        create_app(replace(SETTINGS, **changes))
    message = str(refused.value)
    assert message.startswith(named) and "\n" not in message
    assert all(value not in message for value in changes.values() if len(value) > 8)


def test_the_roles_refuse_to_start_with_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("LEADSTREAM_API_KEYS", f"acme:{ACME}")
    monkeypatch.setenv("LEADSTREAM_SERVER_SECRET", "change-me")
    assert main(["api"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "leadstream api: LEADSTREAM_SERVER_SECRET: the secret is a placeholder; use a long random value "
        "(openssl rand -hex 24)"]
    monkeypatch.setenv("LEADSTREAM_CLICKHOUSE_PASSWORD", "change-me")
    assert main(["sink"]) == 2
    assert capsys.readouterr().err.startswith(
        "leadstream sink: LEADSTREAM_CLICKHOUSE_PASSWORD: its password is a placeholder")


def test_a_key_is_named_by_an_hmac_under_the_server_secret():
    entries = Settings(api_keys=f"acme:{ACME}").api_key_entries()
    one, other = ApiKeys(entries, SERVER_SECRET), ApiKeys(entries, api_key("another-secret"))
    assert one.grant(ACME).actor == f"user:key-{one.key_id(ACME)}" and len(one.key_id(ACME)) == 16
    assert one.key_id(ACME) != other.key_id(ACME)  # without the secret, a key id cannot be computed from a key
    assert one.key_id(ACME) not in hashlib.sha256(ACME.encode()).hexdigest()


def test_read_only_keys_see_webhook_urls_redacted():
    rule = Rule.model_validate({"id": "hot", "when": {"score_at_least": 50}, "then": [
        {"add_tag": "Hot"}, {"webhook": {"url": "https://crm.example/hook?token=s3cr3t", "secret_env": "CRM"}}]})
    keys = ApiKeys(Settings(api_keys=f"acme:{ACME},acme:{ACME_RO}:ro").api_key_entries(), SERVER_SECRET)
    assert rule_json(rule, keys.grant(ACME))["then"][1]["webhook"]["url"] == "https://crm.example/hook?token=s3cr3t"
    redacted = rule_json(rule, keys.grant(ACME_RO))
    assert redacted["then"][1]["webhook"] == {"url": REDACTED, "secret_env": "CRM"}
    assert "s3cr3t" not in str(redacted) and redacted["then"][0] == {"add_tag": {"tag": "Hot"}}


# ------------------------------------------------------------------------------------------ streams


def test_open_streams_are_limited_per_key_and_in_all():
    slots = StreamSlots(total=3, per_key=2)
    first, second = slots.take("a"), slots.take("a")
    with pytest.raises(Exception) as per_key:
        slots.take("a")
    assert (per_key.value.status, per_key.value.code, per_key.value.headers) == (
        429, "too_many_streams", {"Retry-After": "5"})
    slots.take("b")
    with pytest.raises(Exception) as in_all:
        slots.take("c")
    assert in_all.value.status == 503
    first.release()
    first.release()  # once only
    assert slots.open == {"a": 1, "b": 1}
    slots.take("c")
    del second
