"""The definitions store on the real Redis: apply, versions that bump only on change, a refused file that
changes nothing, deletes, the snapshot a running processor reloads from, and webhooks checked for the site
they are stored for (its own secret variables, allowed targets), through the store and through the API."""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from api.app import create_app
from processors.definitions_store import DefinitionsStore
from processors.rules import RuleSet
from processors.webhooks import WebhookTargets
from schemas.definitions import DefinitionsError, load_definitions
from tests.api_keys import api_key
from tests.test_definitions import DESIGN_EXAMPLE as WRITTEN_FOR_ANY_SITE

pytestmark = pytest.mark.integration
SITE = "site-a"
DESIGN_EXAMPLE = WRITTEN_FOR_ANY_SITE.replace("CRM_WEBHOOK_SECRET", "LEADSTREAM_WEBHOOK_SECRET_SITE_A__CRM")


@pytest.fixture
async def store(settings):
    redis = aioredis.from_url(settings.redis_url)
    yield DefinitionsStore(redis, settings.name("ls"))
    await redis.aclose()


async def test_apply_then_versions_bump_only_on_change(store):
    definitions = load_definitions(DESIGN_EXAMPLE, "rules.yaml")
    first = await store.apply(SITE, definitions)
    assert first.site_version == 1 and set(first.versions.values()) == {1} and len(first.changed) == 4
    again = await store.apply(SITE, definitions)
    assert again.site_version == 1 and again.changed == []

    edited = load_definitions(DESIGN_EXAMPLE.replace("score_at_least: 60", "score_at_least: 70"), "rules.yaml")
    third = await store.apply(SITE, edited)
    assert third.site_version == 2 and third.changed == ["rule:hot-lead"]
    assert third.versions == {"rule:viewed-pricing": 1, "rule:hot-lead": 2, "rule:gone-quiet": 1, "board:pipeline": 1}

    snapshot = await store.load(SITE)
    assert snapshot.version == 2 == await store.site_version(SITE)
    assert [(r.id, r.version) for r in snapshot.rules] == [("gone-quiet", 1), ("hot-lead", 2), ("viewed-pricing", 1)]
    assert (await store.get_rule(SITE, "hot-lead")).when.score_at_least == 70
    assert (await store.get_board(SITE, "pipeline")).board.stages[0].entry is True
    assert RuleSet.compile(snapshot.rules, snapshot.version).state_rules[0].version == 2
    assert await store.sites() == [SITE]
    assert await store.site_version("other-site") == 0 and await store.list_rules("other-site") == []


async def test_put_with_defaults_spelled_out_is_not_a_change(store):
    rule = load_definitions(DESIGN_EXAMPLE, "rules.yaml").rules[2]
    assert await store.put_rule(SITE, rule) == 1
    spelled = load_definitions(
        "rules:\n- {id: gone-quiet, when: {inactive_for: 14d}, once: per_lead, then: [{remove_tag: {tag: Consideration, on: lead}}]}\n",
        "r.yaml").rules[0]
    assert await store.put_rule(SITE, spelled) == 1 and await store.site_version(SITE) == 1


async def test_a_refused_file_changes_nothing(store):
    await store.apply(SITE, load_definitions(DESIGN_EXAMPLE, "rules.yaml"))
    before = await store.load(SITE)
    bad = load_definitions(
        "rules:\n- {id: hot-lead, when: {score_at_least: 10}, then: [{add_tag: X}]}\n"
        "- {id: mover, when: {event: pageview}, then: [{move_card: {board: nowhere, stage: new}}]}\n", "bad.yaml")
    with pytest.raises(DefinitionsError) as refused:
        await store.apply(SITE, bad)
    assert refused.value.problems == ["rule mover: then[0].move_card.board: no board 'nowhere'"]
    assert await store.load(SITE) == before


async def test_deletes(store):
    definitions = load_definitions(
        DESIGN_EXAMPLE.replace("- {add_tag: Decision}", "- {move_card: {board: pipeline, stage: decision}}"), "r.yaml")
    await store.apply(SITE, definitions)
    assert await store.delete_rule(SITE, "hot-lead") is True
    assert await store.site_version(SITE) == 2
    assert await store.delete_rule(SITE, "hot-lead") is False and await store.site_version(SITE) == 2
    assert [r.id for r in await store.list_rules(SITE)] == ["gone-quiet", "viewed-pricing"]
    recreated = await store.put_rule(SITE, definitions.rules[1].model_copy(update={"then": definitions.rules[2].then}))
    assert recreated == 3  # a re-created rule never reuses an old version


async def test_segments_are_stored_versioned_and_checked_as_a_whole(store):
    from processors.site_definitions import SiteDefinitionsCache
    from schemas.definitions import DefinitionInUse, DefinitionsFile
    from schemas.segments import Segment
    from tests.test_segment_definitions import CONTRACT_EXAMPLE

    first = await store.apply(SITE, load_definitions(CONTRACT_EXAMPLE, "defs.yaml"))
    assert first.versions["segment:dutch-pricing-viewers"] == 1 and len(first.changed) == 5
    assert [s.id for s in await store.list_segments(SITE)] == [
        "dutch-pricing-viewers", "pricing-companies", "webinar-contacts"]
    assert (await store.get_segment(SITE, "pricing-companies")).of == "account"
    assert (await store.get_board(SITE, "pipeline")).board.import_.segment == "dutch-pricing-viewers"
    edited = load_definitions(CONTRACT_EXAMPLE.replace("value: 39", "value: 49"), "defs.yaml")
    assert (await store.apply(SITE, edited)).changed == ["segment:webinar-contacts"]
    cache = SiteDefinitionsCache(store)
    await cache.prepare([SITE])
    compiled = cache[SITE].segments
    assert compiled.version == 2 and [c.segment_id for c in compiled.lead][:2] == ["dutch-pricing-viewers",
                                                                                   "webinar-contacts"]

    await store.put_segment(SITE, Segment(id="loop-b", name="B"))
    before = await store.load(SITE)
    bad = DefinitionsFile.model_validate({  # each entry valid alone; the file check leaves stored ids to the store
        "segments": [{"id": "loop-a", "name": "A", "if": [{"in_segment": "loop-b"}]},
                     {"id": "loop-b", "name": "B", "if": [{"in_segment": "loop-a"}]},
                     {"id": "ok", "name": "O", "if": [{"in_segment": "nowhere"}]}],
        "boards": [{"id": "other", "name": "O", "import": {"segment": "missing"}, "stages": [{"id": "n", "name": "N"}]}]})
    with pytest.raises(DefinitionsError) as refused:
        await store.apply(SITE, bad)
    assert refused.value.problems == [
        "segment ok: if[0].in_segment: no segment 'nowhere'",
        "board other: import.segment: no segment 'missing'",
        "segment loop-a: in_segment: cycle loop-a -> loop-b -> loop-a",
    ]
    assert await store.load(SITE) == before  # nothing applied

    with pytest.raises(DefinitionInUse) as in_use:
        await store.delete_segment(SITE, "dutch-pricing-viewers")
    assert in_use.value.problems == [
        "segment 'dutch-pricing-viewers' is in use: rule hot: if[0].in_segment: no segment 'dutch-pricing-viewers'",
        "segment 'dutch-pricing-viewers' is in use: board pipeline: import.segment: no segment 'dutch-pricing-viewers'"]
    board = (await store.get_board(SITE, "pipeline")).board
    await store.put_board(SITE, board.model_copy(update={"import_": None, "on_leave": None}))
    await store.delete_rule(SITE, "hot")
    assert await store.delete_segment(SITE, "dutch-pricing-viewers") is True
    assert await store.delete_segment(SITE, "dutch-pricing-viewers") is False
    assert await store.get_segment(SITE, "dutch-pricing-viewers") is None


async def test_a_webhook_signing_with_another_sites_secret_is_refused_and_nothing_stored(store):
    with pytest.raises(DefinitionsError, match="LEADSTREAM_WEBHOOK_SECRET_SITE_A__CRM is not a webhook secret of "
                                               "site site-b: its secrets are named LEADSTREAM_WEBHOOK_SECRET_SITE_B__"):
        await store.apply("site-b", load_definitions(DESIGN_EXAMPLE, "rules.yaml"))
    assert await store.site_version("site-b") == 0
    # the contract's own spelling (a bare name) is stored: it is read from site-a's own variable
    assert (await store.apply(SITE, load_definitions(WRITTEN_FOR_ANY_SITE, "rules.yaml"))).site_version == 1


HOOK_TO = """
rules:
- id: to-crm
  when: {score_at_least: 50}
  then: [{webhook: {url: "%s", secret_env: LEADSTREAM_WEBHOOK_SECRET_SITE_A__CRM}}]
"""


async def test_a_webhook_to_an_internal_address_is_refused_unless_the_allowlist_has_it(settings, store, monkeypatch):
    internal = load_definitions(HOOK_TO % "http://10.20.30.40:8080/hook", "rules.yaml")
    with pytest.raises(DefinitionsError, match=r"then\[0\].webhook.url: 10.20.30.40 is not a public address \(private"):
        await store.apply(SITE, internal)
    with pytest.raises(DefinitionsError, match="credentials in the URL"):
        await store.apply(SITE, load_definitions(HOOK_TO % "https://me:pw@crm.example/hook", "rules.yaml"))
    assert await store.site_version(SITE) == 0

    allowing = DefinitionsStore(store.redis, settings.name("ls"),
                                webhook_targets=WebhookTargets.parse("10.20.0.0/16"))
    assert (await allowing.apply(SITE, internal)).changed == ["rule:to-crm"]
    monkeypatch.setenv("LEADSTREAM_WEBHOOK_ALLOWED_TARGETS", "10.20.30.40")  # a store built without one: the setting
    assert (await DefinitionsStore(store.redis, settings.name("ls")).apply(SITE, internal)).changed == []


def test_the_api_refuses_the_same_webhooks_with_422(settings):
    client = TestClient(create_app(replace(settings, api_keys=f"{SITE}:{api_key(SITE)}")))
    rule = {"id": "to-crm", "when": {"score_at_least": 50},
            "then": [{"webhook": {"url": "https://crm.example/hook", "secret_env": "CRM_WEBHOOK_SECRET"}}]}
    with client:
        answer = client.put(f"/v1/sites/{SITE}/rules/to-crm", json=rule, headers={"X-API-Key": api_key(SITE)})
        assert answer.status_code == 200, answer.text  # a bare name: site-a's own variable signs it
        other = dict(rule, then=[{"webhook": {"url": "https://crm.example/hook",
                                              "secret_env": "LEADSTREAM_WEBHOOK_SECRET_SITE_B__CRM"}}])
        answer = client.put(f"/v1/sites/{SITE}/rules/to-crm", json=other, headers={"X-API-Key": api_key(SITE)})
        assert answer.status_code == 422 and "is not a webhook secret of site site-a" in answer.json()["detail"]
        metadata = dict(rule, then=[{"webhook": {"url": "http://169.254.169.254/latest/meta-data/",
                                                 "secret_env": "LEADSTREAM_WEBHOOK_SECRET_SITE_A__CRM"}}])
        answer = client.put(f"/v1/sites/{SITE}/rules/to-crm", json=metadata, headers={"X-API-Key": api_key(SITE)})
        assert answer.status_code == 422 and "(cloud metadata)" in answer.json()["detail"]
        good = dict(rule, then=[{"webhook": {"url": "https://crm.example/hook",
                                             "secret_env": "LEADSTREAM_WEBHOOK_SECRET_SITE_A__CRM"}}])
        answer = client.put(f"/v1/sites/{SITE}/rules/to-crm", json=good, headers={"X-API-Key": api_key(SITE)})
        assert answer.status_code in (200, 201), answer.text
