"""ClickHouse adapter: connection, versioned migrations and idempotent columnar inserts.

Only this module talks to ClickHouse. Rows are always passed as data, never written into the SQL
text: with clickhouse-driver against ClickHouse 18.16 such an INSERT hangs and stores nothing.

Sharded (`ClickHouseConfig.cluster`, a cluster of the servers' `remote_servers`): every table of the
migrations is `<table>_local` on each shard, with a `Distributed` table of the table's own name in front, on
every shard, so that readers and writers keep using the plain names. Three choices keep the sinks' exactly-once
rows true on shards:
- inserts are synchronous (`insert_distributed_sync`): an insert returns once every shard has its rows, and
  fails, to be retried, while a shard is down (Kafka holds the rows meanwhile);
- the rows a ReplacingMergeTree collapses meet on one shard: a table is sharded by a hash of its sorting key;
- a table deduplicated by its source's offset watermark (`SHARDED_BY_PARTITION`) keeps each source partition
  on one shard: a retried insert that landed on one shard only is then still told apart, per partition.
There is no ZooKeeper here, so no `ON CLUSTER`: `migrate`, erasure and retention go to each shard
(`shard_configs`) with the local names (`local_table`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

from clickhouse_driver import Client

from schemas.settings import ClickHouseConfig

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")  # package data: works from an installed wheel
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


SHARDED_BY_PARTITION = {"events": "raw_partition", "dlq": "raw_partition"}
"""The tables the sinks deduplicate by offset watermark (sinks/table_sink.py), and their partition column."""

SHARDED_SESSION = {"insert_distributed_sync": 1, "distributed_product_mode": "global"}
"""What a client of sharded tables needs: inserts that fail while a shard is down, and a subquery or JOIN on a
Distributed table inside a query on one gathered once (GLOBAL) rather than refused."""


def connect(config: ClickHouseConfig, database: str | None = None) -> Client:
    return Client(
        host=config.host,
        port=config.port,
        database=config.database if database is None else database,
        user=config.user,
        password=config.password,
        connect_timeout=5,
        send_receive_timeout=120,
        settings={"strings_as_bytes": False, **(SHARDED_SESSION if config.cluster else {})},
    )


def local_table(config: ClickHouseConfig, table: str) -> str:
    """The name a table's rows have on each shard (the table itself on one server)."""
    return f"{table}_local" if config.cluster else table


def shard_configs(config: ClickHouseConfig) -> list[ClickHouseConfig]:
    """One config per shard (its first replica), as the server at `config` knows its cluster; [config] on one
    server."""
    if not config.cluster:
        return [config]
    client = connect(config, database="default")
    try:
        rows = client.execute("SELECT host_address, port FROM system.clusters WHERE cluster = %(cluster)s "
                              "AND replica_num = 1 ORDER BY shard_num", {"cluster": config.cluster})
    finally:
        client.disconnect()
    if not rows:
        raise ValueError(f"ClickHouse at {config.host}:{config.port} has no cluster {config.cluster!r} in its "
                         "remote_servers (LEADSTREAM_CLICKHOUSE_CLUSTER)")
    return [replace(config, host=host, port=int(port)) for host, port in rows]


def on_each_shard(config: ClickHouseConfig, sql: str, params: dict | None = None) -> list[list[tuple]]:
    """Run `sql` (naming `local_table`s) on each shard; each shard's result, in shard order."""
    results = []
    for shard in shard_configs(config):
        client = connect(shard)
        try:
            results.append(client.execute(sql, params))
        finally:
            client.disconnect()
    return results


def drop_database(config: ClickHouseConfig) -> None:
    for shard in shard_configs(config):
        connect(shard, database="default").execute(f"DROP DATABASE IF EXISTS {config.database}")


_CREATED_TABLE = re.compile(r"^CREATE TABLE (?:IF NOT EXISTS )?(\w+)", re.I)
_NAMED_TABLE = re.compile(r"\b(TABLE (?:IF NOT EXISTS )?|TO |FROM |INTO |JOIN )(\w+)", re.I)
_SORTING_KEY = re.compile(r"\bORDER BY\s+(\([^)]*\)|\w+)", re.I)


def migration_tables(directory: Path = MIGRATIONS_DIR) -> frozenset[str]:
    """Every table the migrations create."""
    return frozenset(match.group(1) for _, path in migration_files(directory)
                     for statement in split_statements(path.read_text())
                     if (match := _CREATED_TABLE.match(statement)))


def sharding_key(table: str, create_statement: str) -> str:
    if table in SHARDED_BY_PARTITION:
        return SHARDED_BY_PARTITION[table]
    key = _SORTING_KEY.search(create_statement)
    if key is None:
        raise ValueError(f"migration creating {table} has no ORDER BY to shard it by")
    return f"cityHash64({key.group(1).strip('()')})"


def sharded_statements(statement: str, tables: frozenset[str], cluster: str, database: str) -> list[str]:
    """What one migration statement becomes on each shard: the statement on the local tables, then, for a
    created table, its Distributed table, and for a column change, the same change on the Distributed table."""
    local = _NAMED_TABLE.sub(lambda m: m.group(1) + (m.group(2) + "_local" if m.group(2) in tables else m.group(2)),
                             statement)
    out = [local]
    created = _CREATED_TABLE.match(statement)
    if created and created.group(1) in tables:
        table = created.group(1)
        out.append(f"CREATE TABLE IF NOT EXISTS {table} AS {table}_local ENGINE = Distributed({cluster}, {database}, "
                   f"{table}_local, {sharding_key(table, statement)})")
    elif re.match(r"^ALTER TABLE \w+ (ADD|DROP|MODIFY) COLUMN", statement, re.I):
        out.append(statement)
    return out


def split_statements(sql: str) -> list[str]:
    """Split a migration file on `;` at line ends, dropping `--` comment lines."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";\n") if stmt.strip().rstrip(";").strip()]


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name must look like 0001_name.sql: {path.name}")
        found.append((int(match.group(1)), path))
    return found


def migrate(config: ClickHouseConfig, verbose: bool = True) -> list[str]:
    """Create the database and apply every migration not yet recorded in `schema_migrations`; sharded, on each
    shard (each keeps its own record, so a shard added later catches up)."""
    done: list[str] = []
    shards = shard_configs(config)
    tables = migration_tables() if config.cluster else frozenset()
    for shard in shards:
        applied = _migrate_server(shard, tables)
        done += [name for name in applied if name not in done]
        if verbose:
            where = f" on shard {shard.host}:{shard.port}" if config.cluster else ""
            for name in applied:
                print(f"  applied migration {name}{where}", flush=True)
    if verbose and not done:
        print("  ClickHouse schema is up to date", flush=True)
    return done


def _migrate_server(config: ClickHouseConfig, tables: frozenset[str]) -> list[str]:
    connect(config, database="default").execute(f"CREATE DATABASE IF NOT EXISTS {config.database}")
    client = connect(config)
    client.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, applied_at DateTime DEFAULT now())"
        " ENGINE = MergeTree ORDER BY version"
    )
    applied = {row[0] for row in client.execute("SELECT version FROM schema_migrations")}
    done = []
    for version, path in migration_files():
        if version in applied:
            continue
        for statement in split_statements(path.read_text()):
            statement = statement.rstrip(";")
            for sql in (sharded_statements(statement, tables, config.cluster, config.database) if config.cluster
                        else [statement]):
                client.execute(sql)
        client.execute("INSERT INTO schema_migrations (version, name) VALUES", [(version, path.name)])
        done.append(path.name)
    return done


def insert_columnar(client: Client, table: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    """One INSERT of many rows, sent column by column (one block: atomic for a MergeTree insert)."""
    if not rows:
        return
    data = list(zip(*rows))  # the columns, as tuples (the driver takes lists or tuples)
    client.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", data, columnar=True, types_check=False)


def raw_offset_watermarks(client: Client, table: str, topic_column: str) -> dict[tuple[str, int], int]:
    """Highest source offset stored per (source topic, partition): a sink's dedup watermark. Scoped by the
    full topic name, so pipelines with different topic prefixes can share a table. Rows without an offset
    (-1: a dead letter for a record that was never written) take no part."""
    rows = client.execute(f"SELECT {topic_column}, raw_partition, max(raw_offset) FROM {table} WHERE raw_offset >= 0 "
                          f"GROUP BY {topic_column}, raw_partition")
    return {(topic, int(partition)): int(offset) for topic, partition, offset in rows}


class ClientPool:
    """The API's ClickHouse connections: one pool per app, a client per concurrent request (a driver
    client is not thread-safe), reconnecting after a failure."""

    def __init__(self, config: ClickHouseConfig, size: int = 8):
        self.config = config
        self._idle: queue.LifoQueue[Client] = queue.LifoQueue(maxsize=size)

    @contextlib.contextmanager
    def client(self) -> Iterator[Client]:
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            client = connect(self.config)
        try:
            yield client
        except BaseException:
            client.disconnect()
            raise
        try:
            self._idle.put_nowait(client)
        except queue.Full:
            client.disconnect()
