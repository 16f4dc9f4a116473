"""Workflow automation and LeadBoards: the 0005 tables, their sink rows, the read models and the analyst
queries of docs/queries.md, proven on ClickHouse 18.16 and on chdb (a current ClickHouse, in process).

Dataset (site "demo"; a row of site "other" must never show): the rules viewed-pricing, hot-lead and
gone-quiet fired for Ada and Bob (acme.com) and Cyd (globex.com); the anonymous lead-anon was merged into
Ada. On board "pipeline" (account cards) acme.com went new -> consideration -> decision -> customer in
40 hours, globex.com in 4 hours (the last move by a person each time); Eve's lead card only entered.
Replayed records are loaded twice, every one through the sink's own row function.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Sequence

import orjson
import pytest

from api import automation_queries as aq
from api import lead_time as lt
from schemas.boards import StageChange
from schemas.records import JsonRecord
from schemas.rules import LeadChange, LeadSnapshot, RuleExecution
from sinks import clickhouse
from sinks.table_sink import TABLES
from tests.integration.test_lead_profile import AUTOMATION_SECTION, DOCS, ChdbClient, docs_sections

SITE = "demo"
HOUR_MS = 3_600_000
BASE_MS = (int(time.time()) // 86_400 - 3) * 86_400_000

Insert = Callable[[str, Sequence[str], list[Sequence]], None]


def _tag_sources(**tags: tuple[str, int, int]) -> str:
    return orjson.dumps({tag: {"source": "rule", "rule_id": rule_id, "rule_version": version,
                               "event_id": f"e-{rule_id}", "ts_ms": ts}
                         for tag, (rule_id, version, ts) in tags.items()}).decode()


def _change(change_id: str, lead_id: str, kind: str, name: str, hours: float, **extra: Any) -> LeadChange:
    return LeadChange(change_id, extra.pop("site_id", SITE), lead_id, kind, name,  # type: ignore[arg-type]
                      ts_ms=BASE_MS + int(hours * HOUR_MS), **extra)


def _execution(execution_id: str, rule_id: str, lead_id: str, hours: float, **extra: Any) -> RuleExecution:
    return RuleExecution(execution_id, extra.pop("site_id", SITE), rule_id, extra.pop("rule_version", 1), lead_id,
                         extra.pop("trigger", "event"), ts_ms=BASE_MS + int(hours * HOUR_MS), **extra)


def _move(card_id: str, seq: int, from_stage: str, to_stage: str, actor: str, hours: float,
          board_id: str = "pipeline", site_id: str = SITE) -> StageChange:
    rule_id = actor.removeprefix("rule:").partition("@")[0] if actor.startswith("rule:") else ""
    return StageChange(site_id, board_id, card_id, from_stage, to_stage, actor, rule_id, f"e-{card_id}-{seq}",
                       "", BASE_MS + int(hours * HOUR_MS), seq, f"sc-{card_id}-{seq}")


ADA_V1 = LeadSnapshot(SITE, "lead-ada", "ada@acme.com", "acme.com", ["Consideration"],
                      _tag_sources(Consideration=("viewed-pricing", 1, BASE_MS + 6 * HOUR_MS)), 15,
                      '{"plan":"pro"}', BASE_MS, BASE_MS + 6 * HOUR_MS, "", 1)
ADA = LeadSnapshot(SITE, "lead-ada", "ada@acme.com", "acme.com", ["Consideration", "Decision"],
                   _tag_sources(Consideration=("viewed-pricing", 1, BASE_MS + 6 * HOUR_MS),
                                Decision=("hot-lead", 2, BASE_MS + 12 * HOUR_MS)), 70,
                   '{"plan":"pro","last_campaign":"spring","seats":12}', BASE_MS, BASE_MS + 12 * HOUR_MS, "", 2)

RECORDS: list[tuple[str, list[JsonRecord]]] = [
    ("lead_state", [
        ADA_V1, ADA,
        LeadSnapshot(SITE, "lead-bob", "bob@acme.com", "acme.com", ["Consideration"],
                     _tag_sources(Consideration=("viewed-pricing", 1, BASE_MS + 24 * HOUR_MS)), 20, "{}",
                     BASE_MS + 20 * HOUR_MS, BASE_MS + 24 * HOUR_MS, "", 1),
        LeadSnapshot(SITE, "lead-cyd", "cyd@globex.com", "globex.com", ["Consideration", "Decision"],
                     _tag_sources(Consideration=("viewed-pricing", 1, BASE_MS + 31 * HOUR_MS),
                                  Decision=("hot-lead", 2, BASE_MS + 33 * HOUR_MS)), 90, "{}",
                     BASE_MS + 30 * HOUR_MS, BASE_MS + 33 * HOUR_MS, "", 1),
        LeadSnapshot(SITE, "lead-anon", "", "acme.com", ["Consideration"], "{}", 15, "{}", BASE_MS,
                     BASE_MS + 2 * HOUR_MS, "", 1),
        LeadSnapshot(SITE, "lead-anon", "", "acme.com", [], "{}", 0, "{}", BASE_MS, BASE_MS + 2 * HOUR_MS,
                     "lead-ada", 2),
        LeadSnapshot("other", "lead-ada", "", "acme.com", ["Other"], "{}", 99, "{}", BASE_MS, BASE_MS, "", 1),
    ]),
    ("lead_changes", [
        _change("c-anon-1", "lead-anon", "tag_added", "Consideration", 1, rule_id="viewed-pricing", rule_version=1),
        _change("c-ada-1", "lead-ada", "tag_added", "Consideration", 6, rule_id="viewed-pricing", rule_version=1),
        _change("c-ada-1", "lead-ada", "tag_added", "Consideration", 6, rule_id="viewed-pricing", rule_version=1),
        _change("c-ada-2", "lead-ada", "score_changed", "score", 6, value="+15", score=15, rule_id="viewed-pricing"),
        _change("c-ada-3", "lead-ada", "tag_added", "Decision", 12, rule_id="hot-lead", rule_version=2),
        _change("c-ada-4", "lead-ada", "tag_added", "Customer", 13, on="account", account_domain="acme.com"),
        _change("c-bob-1", "lead-bob", "tag_added", "Consideration", 24, rule_id="viewed-pricing", rule_version=1),
        _change("c-cyd-1", "lead-cyd", "tag_added", "Consideration", 31, rule_id="viewed-pricing", rule_version=1),
        _change("c-cyd-2", "lead-cyd", "tag_removed", "Consideration", 32, rule_id="gone-quiet", rule_version=1),
        _change("c-cyd-3", "lead-cyd", "tag_added", "Consideration", 32.5, rule_id="viewed-pricing", rule_version=1),
        _change("c-cyd-4", "lead-cyd", "tag_added", "Decision", 33, rule_id="hot-lead", rule_version=2),
        _change("c-other", "lead-ada", "tag_added", "Decision", 1, site_id="other"),
    ]),
    ("rule_executions", [
        _execution("x-ada-1", "viewed-pricing", "lead-ada", 6, event_id="e-ada-6",
                   actions=["add_tag Consideration", "add_score +15 -> 15"]),
        _execution("x-ada-1", "viewed-pricing", "lead-ada", 6, event_id="e-ada-6",
                   actions=["add_tag Consideration", "add_score +15 -> 15"]),
        _execution("x-ada-2", "hot-lead", "lead-ada", 12, rule_version=2, trigger="state", depth=1,
                   actions=["add_tag Decision", "webhook wh_1"]),
        _execution("x-bob-1", "viewed-pricing", "lead-bob", 24, event_id="e-bob-24",
                   actions=["add_tag Consideration", "add_score +15 -> 20"]),
        _execution("x-cyd-1", "viewed-pricing", "lead-cyd", 31, event_id="e-cyd-31",
                   actions=["add_tag Consideration", "add_score +15 -> 75"]),
        _execution("x-cyd-2", "gone-quiet", "lead-cyd", 32, trigger="time", actions=["remove_tag Consideration"]),
        _execution("x-cyd-3", "viewed-pricing", "lead-cyd", 32.5, event_id="e-cyd-32", outcome="no_change",
                   actions=["add_tag Consideration", "add_score +15 -> 90 (per_event)"]),
        _execution("x-cyd-4", "hot-lead", "lead-cyd", 33, rule_version=2, trigger="state", depth=1,
                   actions=["add_tag Decision"]),
        _execution("x-other", "viewed-pricing", "lead-ada", 40, site_id="other"),
    ]),
    ("stage_changes", [
        _move("account:acme.com", 1, "", "new", "system", 0),
        _move("account:acme.com", 2, "new", "consideration", "rule:viewed-pricing@1", 6),
        _move("account:acme.com", 2, "new", "consideration", "rule:viewed-pricing@1", 6),
        _move("account:acme.com", 3, "consideration", "decision", "rule:hot-lead@2", 12),
        _move("account:acme.com", 4, "decision", "customer", "user:sam", 40),
        _move("account:globex.com", 1, "", "new", "system", 30),
        _move("account:globex.com", 2, "new", "consideration", "rule:viewed-pricing@1", 31),
        _move("account:globex.com", 3, "consideration", "decision", "rule:hot-lead@2", 33),
        _move("account:globex.com", 4, "decision", "customer", "user:sam", 34),
        _move("lead:lead-eve", 1, "", "new", "system", 50),
        _move("account:acme.com", 1, "", "new", "system", 0, site_id="other"),
    ]),
]

LEAD_COLUMNS = ("lead_id", "site_id", "email", "visitors", "account_domain", "merged_into", "first_ts_ms",
                "last_ts_ms", "version")
LEADS = [
    ("lead-ada", SITE, "ada@acme.com", ["va1"], "acme.com", "", BASE_MS, BASE_MS + 12 * HOUR_MS, 2),
    ("lead-anon", SITE, "", [], "", "lead-ada", BASE_MS, BASE_MS + 2 * HOUR_MS, 2),
    ("lead-bob", SITE, "bob@acme.com", ["vb"], "acme.com", "", BASE_MS + 20 * HOUR_MS, BASE_MS + 24 * HOUR_MS, 1),
    ("lead-cyd", SITE, "cyd@globex.com", ["vc"], "globex.com", "", BASE_MS + 30 * HOUR_MS, BASE_MS + 34 * HOUR_MS, 1),
    ("lead-eve", SITE, "", ["ve"], "", "", BASE_MS + 45 * HOUR_MS, BASE_MS + 50 * HOUR_MS, 1),
]


def load_dataset(insert: Insert) -> None:
    """Each record as the sink writes it (its TableSpec's row function), one insert per row: replays and
    versions land in parts of their own, as in production."""
    for table, records in RECORDS:
        spec = TABLES[table]
        for record in records:
            insert(table, spec.columns, [spec.to_row(record.to_json())])
    for row in LEADS:
        insert("leads", LEAD_COLUMNS, [row])


# ---------------------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def chdb_client():
    from chdb import session as chdb_session

    sess = chdb_session.Session()
    client = ChdbClient(sess)
    client.execute("CREATE DATABASE automation")
    client.execute("USE automation")
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


# ------------------------------------------------------------------------------------- shared checks

PARAMS = {"site_id": SITE, "board_id": "pipeline", "final_stage": "customer", "from_ms": BASE_MS,
          "rule_id": "viewed-pricing", "lead_id": "lead-ada", "limit": 2, "offset": 1, "card_id": "account:acme.com",
          "account_board": 1}

# The rows of docs/queries.md's analyst queries (by their `### ` heading) on the dataset, the same on both engines.
EXPECTED_ROWS: dict[str, list[tuple]] = {
    "Which rules fire most": [
        ("viewed-pricing", 4, 3, 3, 0, BASE_MS + int(32.5 * HOUR_MS)),
        ("hot-lead", 2, 2, 2, 2, BASE_MS + 33 * HOUR_MS),
        ("gone-quiet", 1, 1, 1, 0, BASE_MS + 32 * HOUR_MS),
    ],
    # Ada 6 h, Bob 4 h, Cyd 1 h (her first Consideration counts, not the one after its removal);
    # lead-anon was merged away and the account tag is not the lead's.
    "Time from a lead's first event to a tag": [("Consideration", 3, 3.7, 4.0), ("Decision", 2, 7.5, 12.0)],
    "Score distribution by account": [("globex.com", 1, 90.0, 90, 0, 0, 0, 1), ("acme.com", 2, 45.0, 70, 1, 0, 1, 0)],
    # acme: new 6 h, consideration 6 h, decision 28 h; globex: new 1 h, consideration 2 h, decision 1 h
    "Time in stage per board": [
        ("pipeline", "decision", 0, 2, 14.5, 28.0),
        ("pipeline", "consideration", 0, 2, 4.0, 6.0),
        ("pipeline", "new", 1, 2, 3.5, 6.0),
        ("pipeline", "customer", 2, 0, None, None),
    ],
    "Conversion between stages": [
        ("pipeline", "new", "consideration", 2, 3, 0.67),
        ("pipeline", "consideration", "decision", 2, 2, 1.0),
        ("pipeline", "decision", "customer", 2, 2, 1.0),
    ],
    "Lead time: first event to the final stage of a board": [
        ("account:acme.com", BASE_MS, BASE_MS + 40 * HOUR_MS, 40.0),
        ("account:globex.com", BASE_MS + 30 * HOUR_MS, BASE_MS + 34 * HOUR_MS, 4.0),
    ],
    "Stage changes by rule and by person": [
        ("pipeline", "new", 3, 0, 0, 3),
        ("pipeline", "consideration", 2, 2, 0, 0),
        ("pipeline", "customer", 2, 0, 2, 0),
        ("pipeline", "decision", 2, 2, 0, 0),
    ],
}


def _rows(client, sql: str) -> list[tuple]:
    return [tuple(list(value) if isinstance(value, (list, tuple)) else value for value in row)
            for row in client.execute(sql, PARAMS)]


def check_rule_executions(client) -> None:
    newest = aq.rule_executions(client, SITE, "viewed-pricing", limit=10)
    assert [e.execution_id for e in newest] == ["x-cyd-3", "x-cyd-1", "x-bob-1", "x-ada-1"]  # the replay once
    assert newest[-1] == RuleExecution("x-ada-1", SITE, "viewed-pricing", 1, "lead-ada", "event", "e-ada-6",
                                       ["add_tag Consideration", "add_score +15 -> 15"], "changed",
                                       BASE_MS + 6 * HOUR_MS, 0)
    assert aq.rule_executions(client, SITE, "viewed-pricing", limit=2, offset=1) == newest[1:3]
    assert aq.rule_executions(client, SITE, "viewed-pricing", limit=2, offset=4) == []
    assert [e.depth for e in aq.rule_executions(client, SITE, "hot-lead")] == [1, 1]
    assert aq.rule_executions(client, SITE, "no-such-rule") == []
    orjson.dumps(newest)


def check_lead_state(client) -> None:
    ada = aq.lead_state(client, SITE, "lead-ada")
    assert ada == {
        "tags": [
            {"tag": "Consideration", "source": "rule", "rule_id": "viewed-pricing", "rule_version": 1,
             "event_id": "e-viewed-pricing", "ts_ms": BASE_MS + 6 * HOUR_MS},
            {"tag": "Decision", "source": "rule", "rule_id": "hot-lead", "rule_version": 2,
             "event_id": "e-hot-lead", "ts_ms": BASE_MS + 12 * HOUR_MS},
        ],
        "score": 70,
        "properties": {"plan": "pro", "last_campaign": "spring", "seats": 12},
    }
    assert aq.lead_state(client, SITE, "lead-eve") == {"tags": [], "score": 0, "properties": {}}
    assert aq.lead_state(client, "other", "lead-ada")["score"] == 99


def check_analyst_queries(client) -> None:
    queries = documented_queries()
    for heading, expected in EXPECTED_ROWS.items():
        assert (heading, _rows(client, queries[heading])) == (heading, expected)


def check_docs_section(client) -> None:
    """Every query the section documents is either one the API runs (a module constant) or an analyst query
    with its expected rows, and gives rows."""
    api_queries = {_normalised(getattr(module, name)) for module, name in _constants()}
    for heading, block in documented_queries().items():
        assert heading in EXPECTED_ROWS or _normalised(block) in api_queries, heading
        assert _rows(client, block), heading


def documented_queries() -> dict[str, str]:
    """The section's ```sql blocks by their `### ` heading."""
    section = re.split(r"^## ", DOCS.read_text(), flags=re.M)
    body = next(part for part in section if part.startswith(AUTOMATION_SECTION))
    return {heading: re.search(r"```sql\n(.*?)```", text, flags=re.S)[1]
            for heading, text in re.findall(r"^### (.+?)$(.*?)(?=^### |\Z)", body, flags=re.M | re.S)
            if "```sql" in text}


def _normalised(sql: str) -> str:
    return " ".join(sql.split())


def _constants() -> list[tuple[Any, str]]:
    """The SQL the API runs over these tables: (module, constant name)."""
    return [(module, name) for module in (aq, lt) for name in dir(module) if name.endswith("_SQL")]


# ---------------------------------------------------------------------------------------------- tests


class TestPureCore:
    def test_docs_section_quotes_the_api_queries_and_an_expectation_for_every_other(self):
        documented = documented_queries()
        assert len(documented) == len(docs_sections()[AUTOMATION_SECTION])  # one query per heading
        api_queries = {_normalised(getattr(module, name)) for module, name in _constants()}
        assert {"RULE_EXECUTIONS_SQL", "LEAD_STATE_SQL", "CARD_ARRIVALS_SQL", "BOARD_LEAD_TIME_SQL"} == {
            name for _, name in _constants()}
        assert api_queries <= {_normalised(block) for block in documented.values()}
        assert set(EXPECTED_ROWS) == {heading for heading, block in documented.items()
                                      if _normalised(block) not in api_queries}

    def test_tag_list_keeps_every_tag_in_order_with_its_provenance(self):
        sources = '{"Decision": {"source": "user", "ts_ms": 5}}'
        assert aq.tag_list(["Consideration", "Decision"], sources) == [
            {"tag": "Consideration", "source": "", "rule_id": "", "rule_version": 0, "event_id": "", "ts_ms": 0},
            {"tag": "Decision", "source": "user", "rule_id": "", "rule_version": 0, "event_id": "", "ts_ms": 5},
        ]
        assert aq.tag_list([], "") == []

    def test_a_bad_page_is_refused_before_any_query(self):
        class NoServer:
            def execute(self, query, params=None):
                raise AssertionError("no query expected")

        for limit, offset in ((0, 0), (aq.MAX_EXECUTIONS_PAGE + 1, 0), (10, -1)):
            with pytest.raises(ValueError):
                aq.rule_executions(NoServer(), SITE, "viewed-pricing", limit, offset)

    def test_each_new_table_is_fed_by_its_topic_with_its_records_fields(self):
        assert {name: (TABLES[name].topic.name, TABLES[name].columns[:3]) for name in
                ("lead_changes", "lead_state", "rule_executions", "stage_changes")} == {
            "lead_changes": ("leads.changes", ("change_id", "site_id", "lead_id")),
            "lead_state": ("leads.state", ("site_id", "lead_id", "email")),
            "rule_executions": ("rules.executions", ("execution_id", "site_id", "rule_id")),
            "stage_changes": ("board.stage-changes", ("site_id", "board_id", "card_id")),
        }


def _table_columns(client, table: str) -> dict[str, str]:
    return dict(client.execute(f"SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                               f"AND table = '{table}' AND default_kind = ''"))


def check_tables_match_records(client) -> None:
    for table, _ in RECORDS:
        assert tuple(_table_columns(client, table)) == TABLES[table].columns, table


class TestOnChdb:
    """The same SQL on a current ClickHouse engine."""

    def test_tables_match_records(self, chdb_client):
        check_tables_match_records(chdb_client)

    def test_rule_executions(self, chdb_client):
        check_rule_executions(chdb_client)

    def test_lead_state(self, chdb_client):
        check_lead_state(chdb_client)

    def test_analyst_queries(self, chdb_client):
        check_analyst_queries(chdb_client)

    def test_docs_section(self, chdb_client):
        check_docs_section(chdb_client)


@pytest.mark.integration
class TestOnClickHouse18:
    def test_tables_match_records(self, ch_client):
        check_tables_match_records(ch_client)

    def test_read_models(self, ch_client):
        check_rule_executions(ch_client)
        check_lead_state(ch_client)

    def test_analyst_queries_and_docs_section(self, ch_client):
        check_analyst_queries(ch_client)
        check_docs_section(ch_client)
