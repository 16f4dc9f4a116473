"""Webhook delivery, the pure parts: Standard Webhooks signing and verification, what an attempt's result
means, backoff bounds, the circuit breaker, the next step after an attempt, which secrets a site may sign
with, which addresses a webhook may go to (and that a connection goes to a checked one), and the
delivery-log DDL on a current ClickHouse (chdb). The Redis queue and the dispatcher are tested on the real
servers in tests/integration/test_webhooks.py."""

from __future__ import annotations

import base64
import ipaddress
import random
import re
import socket
import time

import httpcore
import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors import webhooks as wh
from schemas.definitions import load_definitions
from schemas.rules import (WebhookRequest, site_secret_token, webhook_secret_name, webhook_secret_problem,
                           webhook_secret_variable)
from schemas.settings import REPO_ROOT
from sinks import clickhouse
from sinks.table_sink import TABLES

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


def test_network_errors_are_retried_and_unusable_or_refused_urls_are_not():
    assert wh.classify_exception(httpcore.ConnectError("refused")).kind == "retryable"
    assert wh.classify_exception(httpcore.ReadTimeout("slow")).error == "timeout"
    assert wh.classify_exception(httpcore.ConnectTimeout("slow")).error == "timeout"
    assert wh.classify_exception(TimeoutError()).error == "timeout"
    assert wh.classify_exception(httpcore.RemoteProtocolError("hung up")).kind == "retryable"
    assert wh.classify_exception(httpcore.UnsupportedProtocol("ftp")).kind == "permanent"
    refused = wh.classify_exception(wh.TargetRefused("10.0.0.1 is not a public address"))
    assert (refused.kind, refused.error) == ("permanent", "refused: 10.0.0.1 is not a public address")


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
        board_id = clickhouse.MIGRATIONS_DIR / "0018_hand_over.sql"  # the stage.changed webhooks' board
        for statement in clickhouse.split_statements(board_id.read_text()):
            if "webhook_deliveries" in statement:
                sess.query(statement.rstrip(";"))
        described = orjson.loads(sess.query("DESCRIBE TABLE webhook_deliveries", "JSON").bytes())["data"]
        assert [c["name"] for c in described if c["default_type"] == ""] == list(TABLES["webhook_deliveries"].columns)
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


# --- which secrets a site's webhooks may sign with --------------------------------------------------


@pytest.mark.parametrize("site, token", [("acme", "ACME"), ("acme-eu.com", "ACME_EU_COM"), ("Acme__EU", "ACME_EU"),
                                         ("-x.9-", "X_9"), ("shop_1", "SHOP_1")])
def test_a_site_id_becomes_its_secret_token(site, token):
    assert site_secret_token(site) == token
    assert webhook_secret_name(site, "CRM") == f"LEADSTREAM_WEBHOOK_SECRET_{token}__CRM"


def test_a_site_signs_only_with_its_own_secret_variables():
    assert webhook_secret_problem("acme", "LEADSTREAM_WEBHOOK_SECRET_ACME__CRM") is None
    assert webhook_secret_problem("acme", "LEADSTREAM_WEBHOOK_SECRET_ACME__CRM_PROD_2") is None
    assert webhook_secret_problem("acme-eu", "LEADSTREAM_WEBHOOK_SECRET_ACME_EU__CRM") is None
    assert webhook_secret_problem("acme", "LEADSTREAM_WEBHOOK_SECRET_GLOBEX__CRM") == (
        "LEADSTREAM_WEBHOOK_SECRET_GLOBEX__CRM is not a webhook secret of site acme: its secrets are named "
        "LEADSTREAM_WEBHOOK_SECRET_ACME__<NAME>")
    # site acme may not reach into site acme-eu's namespace, nor acme-eu into acme's
    assert webhook_secret_problem("acme", "LEADSTREAM_WEBHOOK_SECRET_ACME_EU__CRM") is not None
    assert webhook_secret_problem("acme-eu", "LEADSTREAM_WEBHOOK_SECRET_ACME__EU_CRM") is not None
    assert webhook_secret_problem("acme", "LEADSTREAM_WEBHOOK_SECRET_ACME___CRM") is not None
    assert webhook_secret_problem("acme", "LEADSTREAM_REDIS_URL") == (
        "LEADSTREAM_REDIS_URL is one of LeadStream's own settings; site acme's webhook secrets are named "
        "LEADSTREAM_WEBHOOK_SECRET_ACME__<NAME>")


def test_a_bare_secret_name_is_read_from_the_sites_own_variable_never_from_itself():
    assert webhook_secret_problem("acme-site", "CRM_WEBHOOK_SECRET") is None  # the v1 contract's spelling
    assert webhook_secret_variable("acme-site", "CRM_WEBHOOK_SECRET") == \
        "LEADSTREAM_WEBHOOK_SECRET_ACME_SITE__CRM_WEBHOOK_SECRET"
    assert webhook_secret_variable("acme", "LEADSTREAM_WEBHOOK_SECRET_ACME__CRM") == "LEADSTREAM_WEBHOOK_SECRET_ACME__CRM"
    assert webhook_secret_variable("acme", "__ODD__NAME_") == "LEADSTREAM_WEBHOOK_SECRET_ACME__ODD_NAME"
    assert webhook_secret_problem("acme", webhook_secret_variable("acme", "__ODD__NAME_")) is None


@given(site=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
       name=st.from_regex(r"[A-Z_][A-Z0-9_]{0,30}", fullmatch=True).filter(lambda n: not n.startswith("LEADSTREAM_")))
def test_a_bare_name_always_resolves_inside_its_own_sites_namespace(site, name):
    variable = webhook_secret_variable(site, name)
    assert variable.startswith(webhook_secret_name(site, "")) and webhook_secret_problem(site, variable) is None


SITE_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
SECRET_NAMES = st.from_regex(r"[A-Z0-9]{1,4}(_[A-Z0-9]{1,4}){0,3}", fullmatch=True)


@given(site=SITE_IDS, other=SITE_IDS, name=SECRET_NAMES)
def test_no_variable_is_a_secret_of_two_sites_unless_their_ids_normalise_alike(site, other, name):
    variable = webhook_secret_name(site, name)
    assert webhook_secret_problem(site, variable) is None
    shared = webhook_secret_problem(other, variable) is None
    assert shared == (site_secret_token(site) == site_secret_token(other))


def test_the_rule_format_refuses_leadstreams_own_settings_but_takes_webhook_secret_names():
    rule = """
rules:
- id: hook
  when: {score_at_least: 50}
  then: [{webhook: {url: "https://crm.example/hook", secret_env: %s}}]
"""
    assert load_definitions(rule % "LEADSTREAM_WEBHOOK_SECRET_ACME__CRM", "r.yaml").rules[0].id == "hook"
    for name in ("LEADSTREAM_CLICKHOUSE_PASSWORD", "LEADSTREAM_WEBHOOK_SECRET_ACME"):
        with pytest.raises(ValueError, match="own settings"):
            load_definitions(rule % name, "r.yaml")


# --- where a webhook may go -------------------------------------------------------------------------

NOBODY = wh.WebhookTargets()


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private, RFC 1918"), ("172.31.255.255", "private, RFC 1918"), ("192.168.0.1", "private, RFC 1918"),
    ("100.64.0.1", "shared address space, CGNAT"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("fd12:3456::1", "unique local, ULA"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("169.254.169.254", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"), ("100.100.100.200", "cloud metadata"), ("192.0.2.1", "reserved"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("2001:db8::1", "reserved"),
    ("::ffff:127.0.0.1", "loopback, as 127.0.0.1"), ("::ffff:169.254.169.254", "cloud metadata, as 169.254.169.254"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata, as 169.254.169.254"),
    ("2002:0a00:0001::1", "private, RFC 1918, as 10.0.0.1"),
    ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("::ffff:8.8.8.8", None),
])
def test_address_kinds(address, kind):
    assert wh.address_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1:8765/hook", "127.0.0.1 is not a public address (loopback)"),
    ("http://127.1/hook", "127.0.0.1 is not a public address (loopback)"),
    ("http://2130706433/hook", "127.0.0.1 is not a public address (loopback)"),
    ("http://0x7f.0.0.1/hook", "127.0.0.1 is not a public address (loopback)"),
    ("http://[::ffff:7f00:1]/hook", "::ffff:7f00:1 is not a public address (loopback, as 127.0.0.1)"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is not a public address (cloud metadata)"),
    ("http://[fd00:ec2::254]/", "fd00:ec2::254 is not a public address (cloud metadata)"),
    ("http://localhost:8000/", "localhost resolves to 127.0.0.1, which is not a public address (loopback)"),
    ("http://api.LOCALHOST./", "api.localhost resolves to 127.0.0.1, which is not a public address (loopback)"),
    ("https://user:pass@crm.example/hook", "credentials in the URL (user:password@) are refused"),
    ("https://token@crm.example/hook", "credentials in the URL (user:password@) are refused"),
    ("ftp://crm.example/hook", "only http:// and https:// URLs are webhook targets"),
])
def test_urls_refused_before_any_lookup(url, problem):
    assert wh.url_problem(url, NOBODY).startswith(problem)


def test_names_and_public_addresses_pass_before_the_lookup():
    for url in ("https://crm.example/hook", "http://8.8.8.8/x", "https://[2001:4860:4860::8888]:8443/x"):
        assert wh.url_problem(url, NOBODY) is None


def test_the_allowlist_reallows_named_hosts_and_networks_but_metadata_only_by_exact_address():
    targets = wh.WebhookTargets.parse("crm.internal, 10.0.0.0/8, 127.0.0.1, 169.254.0.0/16")
    assert targets.refusal("crm.internal", [ipaddress.ip_address("192.168.1.5")]) is None  # the name is allowed
    assert targets.refusal("x.example", [ipaddress.ip_address("10.9.9.9")]) is None
    assert targets.refusal("x.example", [ipaddress.ip_address("::ffff:10.9.9.9")]) is None
    assert wh.url_problem("http://127.0.0.1:8765/hook", targets) is None
    assert "(loopback)" in wh.url_problem("http://127.0.0.2/hook", targets)
    assert targets.refusal("x.example", [ipaddress.ip_address("169.254.1.1")]) is None
    assert "(cloud metadata)" in targets.refusal("x.example", [ipaddress.ip_address("169.254.169.254")])
    assert "(cloud metadata)" in targets.refusal("crm.internal", [ipaddress.ip_address("169.254.169.254")])
    exact = wh.WebhookTargets.parse("169.254.169.254")
    assert exact.refusal("x.example", [ipaddress.ip_address("169.254.169.254")]) is None


def test_every_resolved_address_must_pass():
    public, private = ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.1")
    assert NOBODY.refusal("crm.example", [public]) is None
    assert NOBODY.refusal("crm.example", [public, private]) == (
        "crm.example resolves to 10.0.0.1, which is not a public address (private, RFC 1918): webhooks go only to "
        "public addresses unless LEADSTREAM_WEBHOOK_ALLOWED_TARGETS allows it")


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "crm.internal:443", "*.example", "http://crm.internal"])
def test_a_bad_allowlist_entry_is_refused_by_name(entry):
    with pytest.raises(ValueError, match="LEADSTREAM_WEBHOOK_ALLOWED_TARGETS"):
        wh.WebhookTargets.parse(f"crm.internal,{entry}")


@given(st.ip_addresses(v=4))
def test_an_ipv4_address_and_its_ipv6_mapped_form_get_the_same_verdict(ip):
    mapped = ipaddress.ip_address(f"::ffff:{ip}")
    assert (NOBODY.refusal("h.example", [ip]) is None) == (NOBODY.refusal("h.example", [mapped]) is None)


@given(st.ip_addresses())
def test_only_global_addresses_pass_without_an_allowlist(ip):
    if NOBODY.refusal("h.example", [ip]) is None:
        inner = wh.embedded_ipv4(ip)
        assert ip.is_global and not ip.is_multicast and (inner is None or inner.is_global)


def test_definition_problems_name_the_rule_the_field_and_the_fix():
    definitions = load_definitions("""
rules:
- id: good
  when: {score_at_least: 50}
  then: [{webhook: {url: "https://crm.example/hook", secret_env: LEADSTREAM_WEBHOOK_SECRET_ACME__CRM}}]
- id: old
  when: {score_at_least: 60}
  then: [{add_tag: Hot}, {webhook: {url: "http://10.0.0.5/hook", secret_env: CRM_WEBHOOK_SECRET}}]
""", "r.yaml")
    labelled = [(f"rules[{i}] (id: {rule.id})", rule) for i, rule in enumerate(definitions.rules)]
    problems = wh.definition_problems("acme", labelled, NOBODY)
    assert problems == [
        "rules[1] (id: old): then[1].webhook.url: 10.0.0.5 is not a public address (private, RFC 1918): webhooks go "
        "only to public addresses unless LEADSTREAM_WEBHOOK_ALLOWED_TARGETS allows it",
    ]
    assert wh.definition_problems("globex", [("rule good", definitions.rules[0])], NOBODY)[0].startswith(
        "rule good: then[0].webhook.secret_env: LEADSTREAM_WEBHOOK_SECRET_ACME__CRM is not a webhook secret of site "
        "globex")


class ScriptedDns(wh.GuardedNetworkBackend):
    """The guarded backend with DNS answers scripted per lookup (a name's answer changing between lookups
    is DNS rebinding); the connections it makes are real, to 127.0.0.1."""

    def __init__(self, targets: wh.WebhookTargets, answers: list[list[str]]):
        super().__init__(targets)
        self.answers = answers
        self.lookups = 0

    async def resolve(self, host, port, timeout_s):
        self.lookups += 1
        return [ipaddress.ip_address(a) for a in self.answers.pop(0)]


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


async def test_a_connection_goes_to_the_address_that_was_checked_and_a_rebound_name_is_refused(listener):
    backend = ScriptedDns(wh.WebhookTargets.parse("127.0.0.1"), [["127.0.0.1"], ["10.0.0.7"]])
    stream = await backend.connect_tcp("crm.example", listener, timeout=2)
    assert stream.get_extra_info("server_addr")[0] == "127.0.0.1" and backend.lookups == 1
    await stream.aclose()
    with pytest.raises(wh.TargetRefused, match="crm.example resolves to 10.0.0.7"):
        await backend.connect_tcp("crm.example", listener, timeout=2)  # the next connection looks up again


async def test_a_name_with_one_forbidden_address_among_its_answers_is_refused_before_connecting(listener):
    backend = ScriptedDns(wh.WebhookTargets.parse("127.0.0.1"), [["127.0.0.1", "169.254.169.254"]])
    with pytest.raises(wh.TargetRefused, match="cloud metadata"):
        await backend.connect_tcp("crm.example", listener, timeout=2)


async def test_the_real_resolver_is_checked_after_the_lookup(listener):
    with pytest.raises(wh.TargetRefused, match=r"localhost resolves to .*loopback"):
        await wh.GuardedNetworkBackend(NOBODY).connect_tcp("localhost", listener, timeout=2)
    allowed = wh.GuardedNetworkBackend(wh.WebhookTargets.parse("127.0.0.0/8, ::1"))
    answers = await allowed.resolve("localhost", listener, 2)
    stream = await allowed.connect_tcp("localhost", listener, timeout=2)
    assert ipaddress.ip_address(stream.get_extra_info("server_addr")[0]) in answers
    await stream.aclose()
