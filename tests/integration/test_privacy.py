"""Consent and IP truncation end to end: Kafka in -> worker (every processor) -> sink -> ClickHouse, on the
real stack. Events without marketing consent are stored for analytics (events, sessions) but identify no
one and fire no rule; no table holds a whole IP address; a dead letter keeps neither an email nor an IP."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as aioredis

from leadstream.runner import Role, count, produce, wait_for
from processors.definitions_store import DefinitionsStore
from processors.identity import known_lead_id
from schemas.definitions import load_definitions
from sinks.clickhouse import connect

pytestmark = pytest.mark.integration

NOW = int(time.time() * 1000)
DEFINITIONS = """
rules:
- id: filled-a-form
  when: {event: form_submit}
  then: [{add_tag: Interested}]
boards:
- id: pipeline
  name: Pipeline
  card: lead
  stages:
  - {id: new, name: New, entry: true}
  - {id: interested, name: Interested, when_tag: Interested}
"""
# (site, visitor, email, consent, identifies?) -- site "strict" requires consent, site "open" does not
PEOPLE = [
    ("open", "v-ann", "ann@initech.io", None, True),  # no consent stated: today's behaviour
    ("open", "v-bob", "bob@globex.com", ["analytics"], False),
    ("strict", "v-carol", "carol@initech.io", None, False),
    ("strict", "v-dan", "dan@globex.com", ["analytics", "marketing"], True),
]


def _records() -> list[tuple[bytes, bytes]]:
    records = []
    for i, (site, visitor, email, consent, _) in enumerate(PEOPLE):
        common = {"site_id": site, "visitor_id": visitor, "ip": f"198.51.100.{i + 10}", "consent": consent,
                  "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0.0.0 Safari/537.36"}
        records += [
            {**common, "event_id": f"{visitor}-1", "type": "pageview", "ts": NOW - 60_000,
             "url": f"https://acme.com/pricing?email={email}"},
            {**common, "event_id": f"{visitor}-2", "type": "form_submit", "ts": NOW - 30_000, "email": email,
             "url": "https://acme.com/demo", "properties": {"first_name": visitor[2:]}},
        ]
    values = [(r["visitor_id"].encode(), orjson.dumps(r)) for r in records]
    bad = {"event_id": "x", "site_id": "open", "type": "teleport", "visitor_id": "v-eve", "ts": NOW,
           "ip": "203.0.113.77", "email": "eve.adams@initech.io"}
    return values + [(b"v-eve", orjson.dumps(bad))]


async def _apply(settings) -> None:
    redis = aioredis.from_url(settings.redis_url)
    try:
        store = DefinitionsStore(redis, settings.name("ls"))
        for site in ("open", "strict"):
            await store.apply(site, load_definitions(DEFINITIONS, "privacy.yaml"))
    finally:
        await redis.aclose()


@pytest.mark.slow
def test_events_without_marketing_consent_are_analytics_only_and_no_table_keeps_a_whole_ip(settings, roles):
    settings = replace(settings, consent_required_sites="strict")
    asyncio.run(_apply(settings))
    roles += [Role(settings, "worker", "worker").start(), Role(settings, "sink", "sink").start()]
    asyncio.run(produce(settings, _records()))

    wait_for(settings, "SELECT count() FROM events", 2 * len(PEOPLE), 180, roles)
    wait_for(settings, "SELECT count() FROM dlq", 1, 60, roles)
    identified = [(site, email) for site, _, email, _, yes in PEOPLE if yes]
    wait_for(settings, "SELECT count() FROM rule_executions FINAL", len(identified), 120, roles)
    wait_for(settings, "SELECT uniqExact(visitor_id) FROM sessions", len(PEOPLE), 60, roles)
    time.sleep(3)  # anything that should not be there (a firing, a lead) would arrive now

    ch = connect(settings.clickhouse())
    rows = ch.execute("SELECT visitor_id, lead_id, email, url, properties, ip, consent, may_identify FROM events")
    for site, visitor, email, consent, yes in PEOPLE:
        mine = [r for r in rows if r[0] == visitor]
        assert len(mine) == 2 and all(r[7] == int(yes) for r in mine)
        assert all(r[6] == ",".join(consent or ()) for r in mine)
        if not yes:  # stored for analytics, without what identifies the person: no lead, email or form fields
            assert all(r[1] == "" and r[2] == "" and "email=" not in r[3] and r[4] == "{}" for r in mine)
    assert {r[5] for r in rows} == {"198.51.100.0"}  # the /24 of every address, consent or not

    leads = {email for (email,) in ch.execute("SELECT email FROM leads FINAL WHERE email != ''")}
    assert leads == {email for _, email in identified}
    fired = {lead for (lead,) in ch.execute("SELECT lead_id FROM rule_executions FINAL")}
    assert fired == {known_lead_id(site, email) for site, email in identified}
    silent = [f"{visitor}-{n}" for _, visitor, _, _, yes in PEOPLE if not yes for n in (1, 2)]
    assert count(settings, "SELECT count() FROM identity_events WHERE event_id IN %(ids)s", {"ids": tuple(silent)}) == 0
    assert count(settings, "SELECT count() FROM sessions FINAL WHERE email != '' AND visitor_id IN %(v)s",
                 {"v": tuple(v for _, v, _, _, yes in PEOPLE if not yes)}) == 0

    raw, size, digest = ch.execute("SELECT raw, raw_size, raw_sha256 FROM dlq")[0]
    original = _records()[-1][1]
    assert "eve.adams" not in raw and "203.0.113" not in raw and '"ip":""' in raw
    assert '"email":"*********@initech.io"' in raw
    assert (size, digest) == (len(original), hashlib.sha256(original).hexdigest())  # of the whole original
    ch.disconnect()
