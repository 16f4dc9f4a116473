"""Sharded ClickHouse without a server: what the migrations become on each shard (sinks/clickhouse.py), and why
the sinks' exactly-once rows still hold there."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from leadstream import stack
from schemas.settings import ClickHouseConfig, Settings
from sinks import clickhouse
from sinks.table_sink import TABLES

TABLES_CREATED = clickhouse.migration_tables()


def every_sharded_statement() -> list[str]:
    return [sql for _, path in clickhouse.migration_files()
            for statement in clickhouse.split_statements(path.read_text())
            for sql in clickhouse.sharded_statements(statement.rstrip(";"), TABLES_CREATED, "leadstream", "db")]


def distributed_tables() -> dict[str, str]:
    """table -> its sharding key, from the Distributed tables the migrations create on a shard."""
    found = {}
    for sql in every_sharded_statement():
        if match := re.match(r"CREATE TABLE IF NOT EXISTS (\w+) AS (\w+) ENGINE = Distributed\(leadstream, db, (\w+), "
                             r"(.+)\)$", sql):
            table, like, local, key = match.groups()
            assert like == local == f"{table}_local"
            found[table] = key
    return found


def test_every_table_is_a_distributed_table_over_its_local_table():
    assert set(distributed_tables()) == TABLES_CREATED
    assert "events" in TABLES_CREATED and "lead_state" in TABLES_CREATED


def test_each_sinks_watermarked_table_keeps_a_source_partition_on_one_shard():
    """A retried insert may have landed on one shard and not the other; the sink's offset watermark tells
    that apart only if each source partition's rows live on one shard."""
    watermarked = {spec.table: spec.watermark[1] for spec in TABLES.values() if spec.watermark}
    assert watermarked == clickhouse.SHARDED_BY_PARTITION
    keys = distributed_tables()
    assert all(keys[table] == column for table, column in watermarked.items())


def test_rows_a_replacing_table_collapses_meet_on_one_shard():
    """Every other table is sharded by a hash of exactly its sorting key: two versions of a row have the same
    sorting key, hence the same shard, where FINAL and merges collapse them."""
    keys = distributed_tables()
    for _, path in clickhouse.migration_files():
        for statement in clickhouse.split_statements(path.read_text()):
            created = re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", statement)
            if not created or created.group(1) in clickhouse.SHARDED_BY_PARTITION:
                continue
            sorting = re.search(r"ORDER BY\s+\(?([\w, ]+?)\)?;?$", statement.strip(), re.M).group(1)
            assert keys[created.group(1)] == f"cityHash64({sorting})", created.group(1)


def test_views_and_backfills_stay_on_the_shard_of_their_source_rows():
    statements = every_sharded_statement()
    views = [sql for sql in statements if sql.startswith("CREATE MATERIALIZED VIEW")]
    assert views and all(re.search(r" TO \w+_local AS SELECT .* FROM \w+_local", " ".join(v.split())) for v in views)
    copies = [sql for sql in statements if sql.startswith("INSERT INTO")]
    assert copies and all(re.match(r"INSERT INTO \w+_local .* FROM \w+_local", " ".join(c.split())) for c in copies)


def test_a_column_change_reaches_the_local_tables_and_the_distributed_one():
    statement = "ALTER TABLE events ADD COLUMN consent String DEFAULT '' AFTER network_domain"
    assert clickhouse.sharded_statements(statement, TABLES_CREATED, "leadstream", "db") == [
        "ALTER TABLE events_local ADD COLUMN consent String DEFAULT '' AFTER network_domain", statement]


def test_column_names_that_look_like_table_names_are_left_alone():
    statement = "ALTER TABLE leads ADD COLUMN visitor_count UInt32 DEFAULT length(visitors) AFTER created_event_id"
    assert clickhouse.sharded_statements(statement, TABLES_CREATED, "c", "db")[0] == \
        statement.replace("TABLE leads ", "TABLE leads_local ")


def test_one_server_has_plain_names_and_no_sharded_session():
    one = ClickHouseConfig("127.0.0.1", 9000, "leadstream")
    assert clickhouse.local_table(one, "events") == "events"
    assert clickhouse.shard_configs(one) == [one]  # no server asked
    sharded = ClickHouseConfig("127.0.0.1", 9000, "leadstream", cluster="leadstream")
    assert clickhouse.local_table(sharded, "events") == "events_local"
    assert clickhouse.connect(sharded).settings["insert_distributed_sync"] == 1
    assert "insert_distributed_sync" not in clickhouse.connect(one).settings


def test_the_cluster_stacks_servers_name_both_shards(tmp_path):
    settings = stack.cluster_settings(Settings(stack_dir=str(tmp_path / "s")))
    assert settings.clickhouse_cluster == stack.CLICKHOUSE_CLUSTER
    servers = [server for server in stack.servers(settings, cluster=True) if server.name.startswith("clickhouse")]
    assert [server.port for server in servers] == [tcp for tcp, _ in stack.CLUSTER_CLICKHOUSE_SHARDS]
    section = ET.fromstring(stack.remote_servers("leadstream", [19000, 19010]))
    assert [int(port.text) for port in section.iter("port")] == [19000, 19010]
    assert [host.text for host in section.iter("host")] == ["127.0.0.1", "127.0.0.1"]
