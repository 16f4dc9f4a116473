"""Webhook delivery, the pure parts: Standard Webhooks signing and verification, what an attempt's result
means, backoff bounds, the circuit breaker, the next step after an attempt, and the delivery-log DDL on a
current ClickHouse (chdb). The Redis queue and the dispatcher are tested on the real servers in
tests/integration/test_webhooks.py."""

from __future__ import annotations

import base64
import random
import re
import time

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors import webhooks as wh
from schemas.rules import WebhookRequest
from schemas.settings import REPO_ROOT
from sinks import clickhouse

DOCS = (REPO_ROOT / "docs" / "webhooks.md").read_text()


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOCS, flags=re.S)

# The Standard Webhooks specification's published test vector.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_spec_test_vector():
    assert wh.sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_a_raw_secret_is_used_as_its_utf8_bytes():
    # Expected value: HMAC-SHA256(b"leadstream-raw-secret", b'wh_0123456789abcdef.1700000000.{"type":"rule.fired"}'),
    # base64, computed once by the spec's algorithm with Python's hmac module.
    body = b'{"type":"rule.fired"}'
    assert wh.sign("leadstream-raw-secret", "wh_0123456789abcdef", 1700000000, body) == \
        "v1,DADc3CFuJezm9mZBETM7pWRNvxC8O3FkbBvEap3w/Vs="
    as_whsec = "whsec_" + base64.b64encode(b"leadstream-raw-secret").decode()
    assert wh.sign(as_whsec, "wh_1", 1, body) == wh.sign("leadstream-raw-secret", "wh_1", 1, body)


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_", ""])
def test_unusable_secrets_are_refused(secret):
    with pytest.raises(wh.InvalidSecret):
        wh.secret_key(secret)


BODY = b'{"type":"rule.fired","data":{"lead_id":"l1"}}'
HEADERS = wh.signed_headers(SPEC_SECRET, "wh_1", 1_700_000_000, BODY)


def test_verify_round_trip():
    wh.verify(SPEC_SECRET, HEADERS, BODY, now_s=1_700_000_010)
    wh.verify(SPEC_SECRET, {k.title(): v for k, v in HEADERS.items()}, BODY, now_s=1_700_000_000)  # any case
    rotated = dict(HEADERS, **{"webhook-signature": "v1,bm90LXRoaXMtb25l " + HEADERS["webhook-signature"]})
    wh.verify(SPEC_SECRET, rotated, BODY, now_s=1_700_000_000)  # one of several signatures matches


@pytest.mark.parametrize("secret, headers, body, message", [
    (SPEC_SECRET, HEADERS, BODY + b" ", "no matching signature"),
    ("whsec_" + base64.b64encode(b"another key").decode(), HEADERS, BODY, "no matching signature"),
    (SPEC_SECRET, dict(HEADERS, **{"webhook-id": "wh_2"}), BODY, "no matching signature"),
    (SPEC_SECRET, dict(HEADERS, **{"webhook-signature": "v2," + HEADERS["webhook-signature"][3:]}), BODY,
     "no matching signature"),
    (SPEC_SECRET, {k: v for k, v in HEADERS.items() if k != "webhook-signature"}, BODY, "missing"),
    (SPEC_SECRET, dict(HEADERS, **{"webhook-timestamp": "soon"}), BODY, "not an integer"),
    (SPEC_SECRET, dict(HEADERS, **{"webhook-timestamp": str(1_700_000_000 - 301)}), BODY, "tolerance"),
], ids=["tampered body", "other secret", "other id", "unknown version", "missing header", "bad timestamp",
        "stale timestamp"])
def test_verify_refuses(secret, headers, body, message):
    with pytest.raises(wh.WebhookVerificationError, match=message):
        wh.verify(secret, headers, body, now_s=1_700_000_000)


def test_the_body_is_the_envelope_around_the_payload_and_does_not_change():
    request = WebhookRequest(webhook_id="wh_1", site_id="s1", url="https://crm.example/hook", secret_env="X",
                             payload={"lead_id": "l1", "score": 70}, rule_id="hot-lead", ts_ms=1_700_000_000_123)
    body = wh.request_body(request, request.ts_ms)
    assert orjson.loads(body) == {"type": "rule.fired", "timestamp": "2023-11-14T22:13:20.123Z", "site_id": "s1",
                                  "rule_id": "hot-lead", "data": {"lead_id": "l1", "score": 70}}
    assert wh.request_body(request, request.ts_ms) == body


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status):
    assert wh.classify_response(status, {}, "", 0).kind == "success"


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_timeouts_throttling_and_server_errors_are_retried(status):
    result = wh.classify_response(status, {}, "busy", 0)
    assert (result.kind, result.status_code, result.error) == ("retryable", status, f"HTTP {status}: busy")


@pytest.mark.parametrize("status", [301, 302, 400, 401, 403, 404, 410, 422])
def test_other_statuses_fail_for_good(status):
    assert wh.classify_response(status, {}, "", 0).kind == "permanent"


def test_retry_after_is_read_as_seconds_or_http_date():
    assert wh.classify_response(429, httpx.Headers({"Retry-After": "7"}), "", 0).retry_after_s == 7.0
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert wh.parse_retry_after("Tue, 14 Nov 2023 22:14:20 GMT", now) == 60.0
    assert wh.parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0.0
    assert wh.parse_retry_after("whenever", now) is None
    assert wh.parse_retry_after(None, now) is None


def test_network_errors_are_retried_and_unusable_urls_are_not():
    request = httpx.Request("POST", "http://127.0.0.1:9/")
    assert wh.classify_exception(httpx.ConnectError("refused", request=request)).kind == "retryable"
    assert wh.classify_exception(httpx.ReadTimeout("slow", request=request)).error == "timeout"
    assert wh.classify_exception(TimeoutError()).error == "timeout"
    assert wh.classify_exception(httpx.RemoteProtocolError("hung up", request=request)).kind == "retryable"
    assert wh.classify_exception(httpx.UnsupportedProtocol("ftp")).kind == "permanent"


def test_backoff_ceilings_grow_then_cap():
    policy = wh.RetryPolicy()
    assert [policy.ceiling_s(n) for n in range(1, 8)] == [5, 30, 180, 1080, 6480, 7200, 7200]


@given(attempts=st.integers(1, 9), seed=st.integers(0, 2**32), retry_after=st.none() | st.floats(0, 600))
def test_backoff_stays_within_full_jitter_bounds(attempts, seed, retry_after):
    policy = wh.RetryPolicy()
    delay = policy.next_delay_s(attempts, 0.0, random.Random(seed), retry_after)
    assert delay is not None
    assert (retry_after or 0.0) <= delay <= max(policy.ceiling_s(attempts), retry_after or 0.0)


def test_backoff_gives_up_after_max_attempts_or_past_the_budget():
    policy = wh.RetryPolicy(max_attempts=3, total_budget_s=100)
    rng = random.Random(1)
    assert policy.next_delay_s(3, 0.0, rng) is None
    assert policy.next_delay_s(2, 0.0, rng) is not None
    assert policy.next_delay_s(1, 99.0, rng, retry_after_s=5.0) is None  # would start after the budget


def test_breaker_opens_after_consecutive_failures_and_probes_once_after_cooldown():
    breaker = wh.CircuitBreaker(failure_threshold=3, cooldown_s=10)
    breaker.record_failure(0)
    breaker.record_failure(1)
    breaker.record_success()  # a success resets the count
    for t in (2, 3, 4):
        assert breaker.allow(t)
        breaker.record_failure(t)
    assert breaker.state(5) == "open" and not breaker.allow(5)
    assert breaker.retry_at_s(5) == 14
    assert breaker.state(14) == "half_open"
    assert breaker.allow(14)  # the probe
    assert not breaker.allow(14.1)  # only one at a time
    assert breaker.retry_at_s(14.1) == 24.1
    breaker.record_failure(15)  # the probe failed: open for another cool-down
    assert breaker.state(20) == "open" and breaker.state(25) == "half_open"
    assert breaker.allow(25)
    breaker.record_success()  # the probe succeeded: closed
    assert breaker.state(25) == "closed" and breaker.allow(25) and breaker.allow(25)


def test_a_lease_shorter_than_an_attempt_is_refused():
    with pytest.raises(ValueError, match="lease_s"):
        wh.DispatchOptions(request_timeout_s=30, lease_s=20)


def _queued(**changes) -> wh.QueuedWebhook:
    base = wh.QueuedWebhook(webhook_id="wh_1", site_id="s1", rule_id="r1", url="https://crm.example/hook",
                            secret_env="X", body="{}", enqueued_ms=1_000)
    return wh.QueuedWebhook.from_dict({**orjson.loads(base.to_json()), **changes})


def test_next_step_after_each_kind_of_result():
    policy = wh.RetryPolicy(first_delay_s=1, multiplier=2, max_delay_s=4, max_attempts=3, total_budget_s=60)
    rng = random.Random(7)
    updated, outcome, next_ms = wh.next_step(_queued(), wh.AttemptResult("success", 200), policy, 5_000, rng)
    assert (outcome, next_ms, updated.status, updated.attempts, updated.round_started_ms) == \
        ("delivered", None, "delivered", 1, 5_000)

    updated, outcome, next_ms = wh.next_step(_queued(), wh.AttemptResult("retryable", 503, "HTTP 503"), policy,
                                             5_000, rng)
    assert outcome == "retrying" and 5_000 <= next_ms <= 6_000 and updated.status == "pending"
    assert updated.last_error == "HTTP 503"

    exhausted = _queued(attempts=2, round_attempts=2, round_started_ms=4_000)
    updated, outcome, next_ms = wh.next_step(exhausted, wh.AttemptResult("retryable", 0, "timeout"), policy,
                                             9_000, rng)
    assert (outcome, next_ms, updated.status) == ("failed", None, "failed")
    assert updated.last_error == "gave up after 3 attempts: timeout"

    updated, outcome, _ = wh.next_step(_queued(), wh.AttemptResult("permanent", 410, "HTTP 410"), policy, 5_000, rng)
    assert (outcome, updated.status, updated.attempts) == ("failed", "failed", 1)


def test_a_replayed_delivery_numbers_attempts_on_with_a_fresh_budget():
    policy = wh.RetryPolicy(first_delay_s=1, multiplier=2, max_delay_s=4, max_attempts=3, total_budget_s=60)
    replayed = _queued(attempts=3, round_attempts=0, round_started_ms=0)
    updated, outcome, _ = wh.next_step(replayed, wh.AttemptResult("retryable", 500, "HTTP 500"), policy,
                                       100_000, random.Random(1))
    assert (outcome, updated.attempts, updated.round_attempts, updated.round_started_ms) == \
        ("retrying", 4, 1, 100_000)


def test_the_documented_standard_library_verifier_accepts_our_signatures():
    namespace: dict = {}
    exec(doc_blocks("python")[1], namespace)  # the "without LeadStream" snippet
    now = int(time.time())
    headers = wh.signed_headers(SPEC_SECRET, "wh_1", now, BODY)
    assert namespace["verify"](SPEC_SECRET, headers, BODY)
    assert not namespace["verify"](SPEC_SECRET, headers, BODY + b" ")
    raw_headers = wh.signed_headers("plain-secret", "wh_1", now, BODY)
    assert namespace["verify"]("plain-secret", raw_headers, BODY)


def test_delivery_log_ddl_and_documented_queries_run_on_current_clickhouse():
    from chdb import session as chdb_session

    migration = clickhouse.MIGRATIONS_DIR / "0004_webhook_deliveries.sql"
    sess = chdb_session.Session()
    try:
        sess.query("CREATE DATABASE whlog")
        sess.query("USE whlog")
        for statement in clickhouse.split_statements(migration.read_text()):
            sess.query(statement.rstrip(";"))
        described = orjson.loads(sess.query("DESCRIBE TABLE webhook_deliveries", "JSON").bytes())["data"]
        assert [c["name"] for c in described if c["default_type"] == ""] == list(wh.DELIVERY_COLUMNS)
        now_ms = int(time.time() * 1000)
        sess.query("INSERT INTO webhook_deliveries (webhook_id, site_id, rule_id, url, attempt, status_code, outcome,"
                   " error, duration_ms, ts_ms, next_attempt_ms) VALUES"
                   f" ('wh_1','acme-site','hot-lead','https://crm.example/hook',1,500,'retrying','HTTP 500',12,{now_ms - 5000},{now_ms}),"
                   f" ('wh_1','acme-site','hot-lead','https://crm.example/hook',2,200,'delivered','',9,{now_ms},0)")
        queries = doc_blocks("sql")
        assert len(queries) == 3
        for query in queries:
            sess.query(query, "CSV")
        latest = sess.query(queries[1], "CSV").bytes().decode().strip()
        assert latest == '"wh_1","delivered",2,""'
    finally:
        sess.cleanup()
