"""The demo's file and summary on the real stack: the file's segments and board import apply, and the summary
prints visitors apart from leads, each segment's members (as membership fills in ClickHouse) and the board's
cards per stage with the segment it imports from."""

from __future__ import annotations

import re

import pytest

from leadstream.admin import apply_definitions_text
from leadstream.demo import DEMO_DEFINITIONS, allowing_the_crm_stand_in, demo_definitions, summary
from sinks.clickhouse import connect, insert_columnar
from tests import segment_seed as seed

pytestmark = pytest.mark.integration

SITE = seed.SITE


def test_the_summary_prints_members_per_segment_and_the_boards_import(settings):
    settings = allowing_the_crm_stand_in(settings)
    assert apply_definitions_text(settings, demo_definitions(SITE), str(DEMO_DEFINITIONS), SITE, "rules") == 0
    before = summary(settings, SITE, 0)
    assert re.search(r"^  evaluating +lead +0  Evaluating", before, flags=re.M), before
    assert re.search(r"^  busy-companies +account +0  Companies", before, flags=re.M), before

    ch = connect(settings.clickhouse())
    insert = lambda table, columns, rows: insert_columnar(ch, table, columns, rows)  # noqa: E731
    seed.seed_members(insert)
    seed.insert_membership(insert, seed.changes("evaluating", seed.MEMBERSHIP["pricing-viewers"])
                           + seed.changes("busy-companies", seed.MEMBERSHIP["active-companies"]))
    after = summary(settings, SITE, 0)
    assert re.search(r"^  evaluating +lead +3  Evaluating", after, flags=re.M), after  # the visitor not counted
    assert re.search(r"^  busy-companies +account +2  Companies", after, flags=re.M), after
    assert re.search(r"^  known-contacts +lead +0  Known contacts", after, flags=re.M), after
    assert re.search(r"^  pipeline +evaluating +New +0$", after, flags=re.M), after
    assert re.search(r"^  leads +4$", after, flags=re.M) and re.search(r"^  visitors who are not leads +1$", after,
                                                                      flags=re.M), after
