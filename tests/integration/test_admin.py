"""Operator commands on the real stack: IP-range table published to workers, accounts added by hand, a
definitions file that deletes a stage (its cards' commands go to the board processor) or exceeds a site limit."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
import yaml

from leadstream.admin import CLI_ACTOR, add_account, apply_definitions, load_ip_ranges
from processors.lookup_tables import load_ip_table
from sinks.clickhouse import connect
from tests.browser.board_seed import PIPELINE, SITE, BoardSeeder, read_commands

pytestmark = pytest.mark.integration


def test_ip_ranges_are_validated_and_published(settings, tmp_path, capsys):
    csv = tmp_path / "ranges.csv"
    csv.write_text("cidr,domain,company_name,kind\n203.0.113.0/24,acme.com,Acme,company\nnot-a-cidr,x,y\n"
                   "198.51.100.0/24,,Hetzner,datacenter\n")
    assert load_ip_ranges(settings, str(csv)) == 0
    assert "line 3" in capsys.readouterr().out

    async def published():
        redis = aioredis.from_url(settings.redis_url)
        try:
            return (await load_ip_table(redis, settings.name("ls")))[0]
        finally:
            await redis.aclose()

    table = asyncio.run(published())
    assert table.lookup("203.0.113.9").domain == "acme.com"
    assert table.lookup("198.51.100.1").kind == "datacenter"
    assert load_ip_ranges(settings, str(tmp_path / "missing.csv")) == 2


def test_accounts_added_by_hand_are_normalised_and_never_free_mail(settings):
    assert add_account(settings, "acme", "https://www.Globex.io/pricing", "Globex") == 0
    assert add_account(settings, "acme", "gmail.com") == 2
    rows = connect(settings.clickhouse()).execute("SELECT site_id, domain, company_name FROM manual_accounts FINAL")
    assert rows == [("acme", "globex.io", "Globex")]


def test_segments_apply_and_list(settings, tmp_path, capsys):
    from leadstream.admin import apply_definitions, list_definitions
    from tests.test_segment_definitions import CONTRACT_EXAMPLE

    defs = tmp_path / "defs.yaml"
    defs.write_text(CONTRACT_EXAMPLE)
    assert apply_definitions(settings, str(defs), "seg-site", "segments") == 0
    out = capsys.readouterr().out
    assert "1 rules, 3 segments, 1 boards" in out and "segment:pricing-companies -> version 1" in out
    assert list_definitions(settings, "seg-site", "segments") == 0
    listed = capsys.readouterr().out
    assert "segment dutch-pricing-viewers" in listed and "(imported by pipeline)" in listed
    assert "of account" in listed and "rule " not in listed
    assert list_definitions(settings, "seg-site", "rules") == 0
    assert "rule    hot" in capsys.readouterr().out
    defs.write_text(CONTRACT_EXAMPLE.replace("within: 14d", "within: 400d").replace("lead.score", "lead.scor"))
    assert apply_definitions(settings, str(defs), "seg-site", "rules") == 2
    errors = capsys.readouterr().err
    assert "refused, nothing changed" in errors
    assert "segments[0] (id: dutch-pricing-viewers): if[1]: within: at most 366d" in errors
    assert "segments[1] (id: webinar-contacts): if[1]: unknown field 'lead.scor'" in errors


def test_a_file_that_deletes_a_stage_sends_its_cards_to_the_board_processor(settings, tmp_path, capsys):
    board = PIPELINE.model_dump(mode="json", exclude_unset=True)
    path = tmp_path / "boards.yaml"
    path.write_text(yaml.safe_dump({"boards": [board]}))
    assert apply_definitions(settings, str(path), SITE, "boards") == 0
    seeder = BoardSeeder(settings)
    try:
        seeder.show(("account:acme.com", "Acme", ("Decision",), 50), ("account:initech.com", "Initech", (), 5))
    finally:
        seeder.close()
    edited = board | {"stages": [stage for stage in board["stages"] if stage["id"] != "decision"]}
    path.write_text(yaml.safe_dump({"boards": [edited]}))
    assert apply_definitions(settings, str(path), SITE, "boards") == 0
    assert "board pipeline: 1 cards of deleted stages sent" in capsys.readouterr().out
    [(_, command)] = read_commands(settings, 1)
    assert (command.kind, command.card_id, command.actor) == ("stage_deleted", "account:acme.com", CLI_ACTOR)
    assert [s.id for s in type(PIPELINE).model_validate_json(command.board_before).stages] == [
        "new", "consideration", "decision", "customer"]


def test_a_file_over_a_site_limit_is_refused_whole(settings, tmp_path, capsys):
    rules = [{"id": f"r{i}", "when": {"event": "pageview"}, "then": [{"add_score": 1}]} for i in range(3)]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rules": rules}))
    assert apply_definitions(replace(settings, max_rules_per_site=2), str(path), SITE, "rules") == 2
    assert "a site has at most 2 rules (LEADSTREAM_MAX_RULES_PER_SITE)" in capsys.readouterr().err
    assert apply_definitions(replace(settings, max_rules_per_site=3), str(path), SITE, "rules") == 0
