"""Settings for every role, read once from LEADSTREAM_* environment variables.

One flat, frozen object so that a newcomer finds every knob in one place; the README's configuration
table is generated from the same names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MAX_RECORD_BYTES = 1_000_000  # just under Kafka's default 1 MiB message.max.bytes, with room for headers


def _env(name: str, default: str) -> str:
    return os.environ.get(f"LEADSTREAM_{name.upper()}", default)


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default. Env var = LEADSTREAM_ + the upper-cased field name."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    partitions: int = 4
    clickhouse_host: str = "127.0.0.1"
    clickhouse_port: int = 9000
    clickhouse_http_port: int = 8123
    clickhouse_database: str = "leadstream"
    clickhouse_user: str = "default"
    clickhouse_password: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    stack_dir: str = str(REPO_ROOT / ".stack")
    cache_dir: str = str(Path.home() / ".cache" / "leadstream")
    kafka_version: str = "3.9.1"
    worker_batch_size: int = 2000
    worker_batch_ms: int = 100
    sink_batch_size: int = 20000
    sink_batch_ms: int = 500
    max_payload_bytes: int = 65536
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES  # larger outputs are dead letters (output_too_large)
    session_inactivity_min: int = 30
    session_grace_min: int = 60
    dedup_window_min: int = 1440  # a re-sent event id is a dead letter if its original is this recent...
    dedup_max_ids: int = 1000  # ...and among the visitor's last this many events
    visitor_state_ttl_days: int = 30  # a visitor's sessionizer state expires after this long idle
    lead_max_visitors: int = 1000  # visitors listed on a lead record (all of them still resolve to it)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_keys: str = ""  # "site:key" (read-write) or "site:key:ro" (read-only), comma-separated

    @classmethod
    def from_env(cls) -> "Settings":
        values = {}
        for f in fields(cls):
            raw = _env(f.name, str(f.default))
            values[f.name] = int(raw) if f.type in (int, "int") else raw
        return cls(**values)

    def as_env(self) -> dict[str, str]:
        """These settings as LEADSTREAM_* variables, to hand to a child process."""
        return {f"LEADSTREAM_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}

    def name(self, base: str) -> str:
        """A consumer-group / app / key-space name, namespaced by the topic prefix (isolates tests)."""
        return f"{self.topic_prefix}{base}"

    def topic(self, name: str) -> str:
        """Full topic name: the configurable prefix + the logical name (events.raw, events.dlq, ...)."""
        return f"{self.topic_prefix}{name}"

    def kafka(self) -> KafkaConfig:
        return KafkaConfig(self.kafka_bootstrap, self.topic_prefix, self.partitions, self.max_record_bytes)

    def clickhouse(self) -> ClickHouseConfig:
        return ClickHouseConfig(self.clickhouse_host, self.clickhouse_port, self.clickhouse_database,
                                self.clickhouse_user, self.clickhouse_password)

    def batch(self) -> BatchConfig:
        return BatchConfig(self.worker_batch_size, self.worker_batch_ms)

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.rsplit(":", 1)[1])

    @property
    def redis_port(self) -> int:
        return int(self.redis_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])




@dataclass(frozen=True)
class KafkaConfig:
    """What the Kafka adapters need: where the broker is and how topics are named and partitioned."""

    bootstrap: str
    topic_prefix: str = ""
    partitions: int = 4
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES  # key + value of one produced record, at most

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, base: str) -> str:
        return f"{self.topic_prefix}{base}"


@dataclass(frozen=True)
class ClickHouseConfig:
    host: str
    port: int
    database: str
    user: str = "default"
    password: str = ""


@dataclass(frozen=True)
class BatchConfig:
    """How much a stage takes from Kafka at once: at most `size` messages, waiting at most `wait_ms`."""

    size: int = 2000
    wait_ms: int = 100
