"""Kafka in -> worker -> sink -> ClickHouse out, on the real stack: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from leadstream.runner import Role, count, produce, wait_for

pytestmark = pytest.mark.integration

BASE_MS = int(time.time() * 1000) - 3_600_000


def valid_events(n: int, site: str = "it", visitors: int = 50) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        visitor = f"v{i % visitors}"
        event = {
            "event_id": f"e{i}", "site_id": site, "type": "pageview", "visitor_id": visitor,
            "ts": BASE_MS + i * 1000, "url": f"https://acme.com/p{i % 7}?utm_source=news&utm_medium=email",
            "referrer": "https://www.google.com/search?q=acme", "user_agent": "Mozilla/5.0 (X11; Linux x86_64) "
            "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36", "ip": "192.0.2.7",
        }
        out.append((visitor.encode(), orjson.dumps(event)))
    return out


INVALID = [
    (b"{not json", "bad_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (orjson.dumps({"site_id": "it", "type": "pageview", "ts": BASE_MS, "visitor_id": "v"}), "missing_field"),
    (orjson.dumps({"event_id": "x1", "site_id": "it", "type": "pageview", "ts": [1], "visitor_id": "v"}), "wrong_type"),
    (orjson.dumps({"event_id": "x2", "site_id": "it", "type": "teleport", "ts": BASE_MS, "visitor_id": "v"}), "unknown_event_type"),
    (orjson.dumps({"event_id": "x3", "site_id": "it", "type": "pageview", "ts": BASE_MS + 3 * 86_400_000, "visitor_id": "v"}), "ts_in_future"),
    (orjson.dumps({"event_id": "x4", "site_id": "it", "type": "pageview", "ts": BASE_MS, "visitor_id": "v\x00x"}), "invalid_value"),
    (b'{"event_id": "x5", "title": "\xff\xfe"}', "bad_encoding"),
    (orjson.dumps({"event_id": "x6", "site_id": "it", "type": "pageview", "ts": BASE_MS, "visitor_id": "v", "title": "x" * 70_000}), "oversized"),
]


def _mixed(n_valid: int) -> list[tuple[bytes | None, bytes]]:
    records: list[tuple[bytes | None, bytes]] = list(valid_events(n_valid))
    for i, (value, _) in enumerate(INVALID):  # spread the bad ones through the stream
        records.insert((i + 1) * len(records) // (len(INVALID) + 1), (b"v0", value))
    return records


def test_valid_rows_and_dead_letters_exactly_once(settings, roles):
    roles += [Role(settings, "worker", "worker").start(), Role(settings, "sink", "sink").start()]
    n = 3000
    asyncio.run(produce(settings, _mixed(n)))

    wait_for(settings, "SELECT count() FROM events", n, 180, roles)
    wait_for(settings, "SELECT count() FROM dlq", len(INVALID), 60, roles)
    time.sleep(2)  # anything extra (a duplicate) would arrive now
    assert count(settings, "SELECT count() FROM events") == n
    assert count(settings, "SELECT uniqExact(event_id) FROM events") == n
    from sinks.clickhouse import connect

    reasons = dict(connect(settings.clickhouse()).execute("SELECT reason, count() FROM dlq GROUP BY reason"))
    assert reasons == {reason: 1 for _, reason in INVALID}
    # the original bytes are kept untouched
    raw = connect(settings.clickhouse()).execute("SELECT hex(raw) FROM dlq WHERE reason = 'bad_json'")[0][0]
    assert bytes.fromhex(raw) == b"{not json"
    enriched = connect(settings.clickhouse()).execute(
        "SELECT channel, utm_source, url_domain, browser FROM events WHERE event_id = 'e1'")[0]
    assert enriched == ("email", "news", "acme.com", "Chrome")


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["sink", "worker"])
def test_role_killed_mid_stream_still_exactly_once(settings, roles, victim):
    by_name = {"worker": Role(settings, "worker", "worker").start(), "sink": Role(settings, "sink", "sink").start()}
    roles += by_name.values()
    n = 40_000
    asyncio.run(produce(settings, valid_events(n, visitors=2000)))
    wait_for(settings, "SELECT count() FROM events", n // 4, 180, roles)
    by_name[victim].kill()  # SIGKILL: no flush, no commit, no goodbye
    by_name[victim].start()
    wait_for(settings, "SELECT count() FROM events", n, 240, roles)
    time.sleep(3)  # a duplicate would arrive now
    assert count(settings, "SELECT count() FROM events") == n
    assert count(settings, "SELECT uniqExact(event_id) FROM events") == n
