"""Lead time (api/lead_time.py): the pure core, its SQL on ClickHouse 18.16 and on chdb (a current ClickHouse,
in process), and a property test of the board query against a plain-Python reading of the same rows.

Dataset (site "lt"): on board "pipeline" (account cards; new -> consideration -> decision -> customer)
- acme.com (Ada first seen at 0 h, Bob at 20 h) entered at 2 h, consideration at 6 h (the stage change
  replayed), decision at 12 h, forced back to consideration at 14 h and on to decision at 16 h, customer
  at 40 h;
- globex.com (Cyd, 30 h) entered at 30 h, then 31 h, 33 h, customer at 34 h, and once a stage since deleted;
- initech.com, added by hand, nobody from it seen: new at 10 h, consideration at 20 h;
- hooli.com, added by hand at 5 h, its first lead (Hal) seen at 8 h: consideration at 9 h;
- lead:lead-eve (no account, first seen 45 h) entered at 50 h;
- lead:lead-anon (merged into Ada) and lead:lead-dan (joined acme.com) moved before they left the board.
On board "people" (lead cards; new -> hot): Dan (first seen 20 h) new at 21 h, hot at 25 h; lead-anon new.
Rows of another site and of another board must never count.

The last test runs it end to end: commands through the API, the real board processor and the stage changes'
sink, then the lead time the API reads back.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace
from typing import Callable, Sequence

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api import lead_time as lt
from leadstream.runner import Role
from schemas.boards import BoardDefinition, StageChange, StageDefinition
from sinks import clickhouse
from sinks.table_sink import TABLES
from tests.browser.board_seed import API_KEYS, KEY, serve_api
from tests.browser.board_seed import PIPELINE as BOARD_PIPELINE
from tests.browser.board_seed import SITE as BOARD_SITE
from tests.integration.test_lead_profile import ChdbClient
from tests.integration.test_stage_deletion import applied, eventually

SITE = "lt"
HOUR_MS = 3_600_000
BASE_MS = (int(time.time()) // 86_400 - 3) * 86_400_000

PIPELINE = BoardDefinition(id="pipeline", name="Sales pipeline", card="account", stages=[
    StageDefinition(id="new", name="New", entry=True),
    StageDefinition(id="consideration", name="Consideration", when_tag="Consideration"),
    StageDefinition(id="decision", name="Decision", when_tag="Decision"),
    StageDefinition(id="customer", name="Customer"),
])
PEOPLE = BoardDefinition(id="people", name="People", card="lead", stages=[
    StageDefinition(id="new", name="New", entry=True), StageDefinition(id="hot", name="Hot", when_tag="Hot")])

Insert = Callable[[str, Sequence[str], list[Sequence]], None]
LEAD_COLUMNS = ("lead_id", "site_id", "email", "visitors", "account_domain", "merged_into", "first_ts_ms",
                "last_ts_ms", "version")


def at(hours: float) -> int:
    return BASE_MS + int(hours * HOUR_MS)


def _moves(card_id: str, *stages_at: tuple[str, float], board_id: str = "pipeline", site_id: str = SITE
           ) -> list[StageChange]:
    changes, before = [], ""
    for seq, (stage, hours) in enumerate(stages_at, start=1):
        changes.append(StageChange(site_id, board_id, card_id, before, stage, "system", ts_ms=at(hours), seq=seq,
                                   stage_change_id=f"sc-{board_id}-{card_id}-{seq}"))
        before = stage
    return changes


ACME = _moves("account:acme.com", ("new", 2), ("consideration", 6), ("decision", 12), ("consideration", 14),
              ("decision", 16), ("customer", 40))
STAGE_CHANGES = [
    *ACME, ACME[1],  # a replayed stage change
    *_moves("account:globex.com", ("new", 30), ("consideration", 31), ("decision", 33), ("customer", 34),
            ("trial", 35)),
    *_moves("account:initech.com", ("new", 10), ("consideration", 20)),
    *_moves("account:hooli.com", ("new", 5), ("consideration", 9)),
    *_moves("lead:lead-eve", ("new", 50)),
    *_moves("lead:lead-anon", ("new", 1), ("consideration", 3)),
    *_moves("lead:lead-dan", ("new", 21)),
    *_moves("lead:lead-dan", ("new", 21), ("hot", 25), board_id="people"),
    *_moves("lead:lead-anon", ("new", 1), board_id="people"),
    *_moves("account:acme.com", ("new", 0), ("customer", 1), site_id="other"),
    *_moves("account:acme.com", ("new", 0), ("customer", 1), board_id="other-board"),
]
LEADS = [
    ("lead-ada", SITE, "ada@acme.com", ["va"], "acme.com", "", at(0), at(40), 2),
    ("lead-ada", SITE, "ada@acme.com", ["va"], "acme.com", "", at(1), at(3), 1),  # an older version
    ("lead-bob", SITE, "bob@acme.com", ["vb"], "acme.com", "", at(20), at(24), 1),
    ("lead-cyd", SITE, "cyd@globex.com", ["vc"], "globex.com", "", at(30), at(34), 1),
    ("lead-hal", SITE, "", ["vh"], "hooli.com", "", at(8), at(9), 1),
    ("lead-eve", SITE, "", ["ve"], "", "", at(45), at(50), 1),
    ("lead-anon", SITE, "", ["vx"], "", "", at(-10), at(3), 1),
    ("lead-anon", SITE, "", [], "", "lead-ada", at(-10), at(3), 2),  # merged into Ada
    ("lead-dan", SITE, "", ["vd"], "", "", at(20), at(21), 1),
    ("lead-dan", SITE, "dan@acme.com", ["vd"], "acme.com", "", at(20), at(26), 2),  # joined acme.com
    ("lead-zed", "other", "", ["vz"], "acme.com", "", at(-100), at(0), 1),
]


def load_dataset(insert: Insert) -> None:
    spec = TABLES["stage_changes"]
    for change in STAGE_CHANGES:  # one insert per row: replays land in parts of their own, as in production
        insert("stage_changes", spec.columns, [spec.to_row(change.to_json())])
    for row in LEADS:
        insert("leads", LEAD_COLUMNS, [row])


@pytest.fixture(scope="module")
def chdb_client():
    from chdb import session as chdb_session

    sess = chdb_session.Session()
    client = ChdbClient(sess)
    client.execute("CREATE DATABASE leadtime")
    client.execute("USE leadtime")
    client.execute("SET output_format_json_quote_64bit_integers = 0")
    for _, path in clickhouse.migration_files():
        for statement in clickhouse.split_statements(path.read_text()):
            client.execute(statement.rstrip(";"))
    load_dataset(client.insert)
    yield client
    sess.cleanup()


@pytest.fixture
def ch_client(settings):
    """The `settings` database (migrated on the real ClickHouse 18.16) with the dataset loaded."""
    client = clickhouse.connect(settings.clickhouse())
    load_dataset(lambda table, columns, rows: clickhouse.insert_columnar(client, table, columns, rows))
    return client


def nearest_rank(values: list[int], q: float) -> int:
    return sorted(values)[math.ceil(q * len(values)) - 1]


H = HOUR_MS


def check_cards(client) -> None:
    acme = lt.read_card_lead_time(client, SITE, PIPELINE, "account:acme.com", at(0))
    assert acme == lt.CardLeadTime(at(0), (
        lt.StageArrival("new", "New", at(2), 2 * H), lt.StageArrival("consideration", "Consideration", at(6), 6 * H),
        lt.StageArrival("decision", "Decision", at(12), 12 * H),
        lt.StageArrival("customer", "Customer", at(40), 40 * H)), "customer", 40 * H)
    globex = lt.read_card_lead_time(client, SITE, PIPELINE, "account:globex.com", at(30))
    assert [s.stage_id for s in globex.stages] == ["new", "consideration", "decision", "customer"]  # no "trial"
    assert globex.lead_time_ms == 4 * H
    initech = lt.read_card_lead_time(client, SITE, PIPELINE, "account:initech.com", 0)  # nobody seen: from entry
    assert (initech.start_ms, [s.lead_time_ms for s in initech.stages], initech.lead_time_ms) == (at(10), [0, 10 * H],
                                                                                                  None)
    hooli = lt.read_card_lead_time(client, SITE, PIPELINE, "account:hooli.com", at(8))  # added before first seen
    assert (hooli.start_ms, hooli.stages[-1].lead_time_ms) == (at(5), 4 * H)
    fresh = lt.read_card_lead_time(client, SITE, PIPELINE, "account:hooli.com", at(8), current=("decision", at(11)))
    assert [(s.stage_id, s.lead_time_ms) for s in fresh.stages] == [("new", 0), ("consideration", 4 * H),
                                                                     ("decision", 6 * H)]
    assert lt.read_card_lead_time(client, "other", PIPELINE, "account:initech.com", 0).stages == ()


def check_boards(client) -> None:
    pipeline = lt.read_board_lead_time(client, SITE, PIPELINE)
    assert pipeline.stages == (
        lt.StageLeadTime("new", "New", 5, 0, 5 * H),  # acme 2 h, globex, initech, hooli 0, eve 5 h
        lt.StageLeadTime("consideration", "Consideration", 4, 4 * H, 10 * H),  # 1, 4, 6, 10 h
        lt.StageLeadTime("decision", "Decision", 2, 3 * H, 12 * H),
        lt.StageLeadTime("customer", "Customer", 2, 4 * H, 40 * H),
    )
    assert (pipeline.final_stage_id, pipeline.lead_time) == ("customer", pipeline.stages[-1])
    people = lt.read_board_lead_time(client, SITE, PEOPLE)  # Dan has an account, but this board shows leads
    assert people.stages == (lt.StageLeadTime("new", "New", 1, H, H), lt.StageLeadTime("hot", "Hot", 1, 5 * H, 5 * H))
    empty = lt.read_board_lead_time(client, "nobody", PIPELINE)
    assert [(s.cards, s.median_ms, s.p90_ms) for s in empty.stages] == [(0, None, None)] * 4


PROPERTY_SITES = itertools.count()


class TestPureCore:
    @given(first_seen=st.integers(0, 10**6),
           arrivals=st.dictionaries(st.sampled_from(["new", "consideration", "decision", "customer", "gone"]),
                                    st.integers(1, 10**6)),
           current=st.none() | st.tuples(st.sampled_from(["new", "decision", "customer"]), st.integers(1, 10**6)))
    def test_a_cards_lead_times(self, first_seen, arrivals, current):
        card = lt.card_lead_time(PIPELINE, first_seen, arrivals, current)
        known = dict(arrivals)
        if current is not None:
            known.setdefault(*current)
        ids = [stage.id for stage in PIPELINE.stages]
        assert [s.stage_id for s in card.stages] == [stage for stage in ids if stage in known]  # board order
        assert all(s.entered_ms == known[s.stage_id] and s.lead_time_ms == s.entered_ms - card.start_ms >= 0
                   for s in card.stages)
        assert card.start_ms == min([first_seen] * (first_seen > 0) + list(known.values()), default=0)
        assert card.lead_time_ms == (known["customer"] - card.start_ms if "customer" in known else None)

    def test_a_boards_figures_keep_its_stage_order_and_leave_out_deleted_stages(self):
        figures = lt.board_lead_time({"decision": (2, 3, 9), "trial": (1, 1, 1), "new": (4, 1, 2)}, PIPELINE)
        assert [(s.stage_id, s.cards, s.median_ms, s.p90_ms) for s in figures.stages] == [
            ("new", 4, 1, 2), ("consideration", 0, None, None), ("decision", 2, 3, 9), ("customer", 0, None, None)]
        assert figures.lead_time == lt.StageLeadTime("customer", "Customer", 0, None, None)


class TestOnChdb:
    def test_cards(self, chdb_client):
        check_cards(chdb_client)

    def test_boards(self, chdb_client):
        check_boards(chdb_client)

    @settings(max_examples=30, deadline=None)
    @given(cards=st.lists(st.tuples(
        st.sampled_from(["account", "lead"]),
        st.integers(0, 50),  # first seen (0: no lead)
        st.lists(st.tuples(st.sampled_from(["new", "consideration", "decision", "customer"]), st.integers(1, 99)),
                 min_size=1, max_size=5)), min_size=1, max_size=8))
    def test_board_figures_are_the_nearest_ranks_of_every_cards_first_arrivals(self, chdb_client, cards):
        site = f"prop-{next(PROPERTY_SITES)}"
        expected: dict[str, list[int]] = {}
        for i, (kind, first_seen, moves) in enumerate(cards):
            card_id = f"account:c{i}.example" if kind == "account" else f"lead:l{i}"
            if first_seen:
                domain = f"c{i}.example" if kind == "account" else ""
                chdb_client.insert("leads", LEAD_COLUMNS, [(f"l{i}", site, "", [], domain, "", first_seen, 99, 1)])
            changes = [StageChange(site, "pipeline", card_id, "", stage, "system", ts_ms=ts, seq=seq)
                       for seq, (stage, ts) in enumerate(moves, start=1)]
            spec = TABLES["stage_changes"]
            chdb_client.insert("stage_changes", spec.columns, [spec.to_row(c.to_json()) for c in changes])
            start = min([first_seen] * (first_seen > 0) + [ts for _, ts in moves])
            for stage in {stage for stage, _ in moves}:
                expected.setdefault(stage, []).append(min(ts for s, ts in moves if s == stage) - start)
        figures = lt.read_board_lead_time(chdb_client, site, PIPELINE)
        assert {s.stage_id: (s.cards, s.median_ms, s.p90_ms) for s in figures.stages if s.cards} == {
            stage: (len(times), nearest_rank(times, 0.5), nearest_rank(times, 0.9))
            for stage, times in expected.items()}


@pytest.mark.integration
class TestOnClickHouse18:
    def test_cards_and_boards(self, ch_client):
        check_cards(ch_client)
        check_boards(ch_client)


@pytest.mark.integration
@pytest.mark.slow
def test_lead_time_follows_moves_through_the_board_processor_and_the_sink(settings, roles):
    """acme.com's first lead was seen 10 hours ago; the account is added by domain, then won: its lead time
    is 10 hours, on the board's figures and in its panel. initech.com, nobody from it seen, is added too."""
    roles += [Role(settings, "worker", "worker", "--processors", "board").start(),
              Role(settings, "sink", "sink", "--tables", "stage_changes").start()]
    seen_ms = int(time.time() * 1000) - 10 * HOUR_MS
    clickhouse.insert_columnar(clickhouse.connect(settings.clickhouse()), "leads", LEAD_COLUMNS, [
        ("lead-ann", BOARD_SITE, "ann@acme.com", ["v-ann"], "acme.com", "", seen_ms, seen_ms, 1)])
    board = f"/v1/sites/{BOARD_SITE}/boards/{BOARD_PIPELINE.id}"
    with serve_api(replace(settings, api_keys=API_KEYS)) as base, \
            httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30) as http:
        assert http.put(board, json=BOARD_PIPELINE.model_dump(mode="json", exclude_unset=True)).status_code == 200
        for domain in ("acme.com", "initech.com"):
            applied(http, f"{board}/cards", {"domain": domain}, f"add-{domain}")
        applied(http, f"{board}/cards/account:acme.com/move", {"to": "customer"}, "won-acme")
        won_ms = int(time.time() * 1000)

        figures = eventually(lambda: (answer := http.get(f"{board}/lead-time").json())["lead_time"]["cards"] == 1
                             and answer, timeout_s=60)
        assert [(s["stage_id"], s["cards"]) for s in figures["stages"]] == [
            ("new", 2), ("consideration", 0), ("decision", 0), ("customer", 1)]
        assert 10 * HOUR_MS <= figures["lead_time"]["median_ms"] <= won_ms - seen_ms
        assert figures["stages"][0]["median_ms"] <= 60_000  # initech.com counts from entering the board
        panel = http.get(f"{board}/cards/account:acme.com").json()["lead_time"]
        assert panel["start_ms"] == seen_ms and [s["stage_id"] for s in panel["stages"]] == ["new", "customer"]
        assert panel["lead_time_ms"] == figures["lead_time"]["median_ms"]
