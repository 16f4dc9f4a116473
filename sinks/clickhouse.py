"""ClickHouse adapter: connection, versioned migrations and idempotent columnar inserts.

Only this module talks to ClickHouse. Rows are always passed as data, never written into the SQL
text: with clickhouse-driver against ClickHouse 18.16 such an INSERT hangs and stores nothing.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
from pathlib import Path
from typing import Iterator, Sequence

from clickhouse_driver import Client

from schemas.settings import ClickHouseConfig

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")  # package data: works from an installed wheel
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def connect(config: ClickHouseConfig, database: str | None = None) -> Client:
    return Client(
        host=config.host,
        port=config.port,
        database=config.database if database is None else database,
        user=config.user,
        password=config.password,
        connect_timeout=5,
        send_receive_timeout=120,
        settings={"strings_as_bytes": False},
    )


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
    """Create the database and apply every migration not yet recorded in `schema_migrations`."""
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
            client.execute(statement.rstrip(";"))
        client.execute("INSERT INTO schema_migrations (version, name) VALUES", [(version, path.name)])
        done.append(path.name)
        if verbose:
            print(f"  applied migration {path.name}", flush=True)
    if verbose and not done:
        print("  ClickHouse schema is up to date", flush=True)
    return done


def insert_columnar(client: Client, table: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    """One INSERT of many rows, sent column by column (one block: atomic for a MergeTree insert)."""
    if not rows:
        return
    data = [list(col) for col in zip(*rows)]
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
