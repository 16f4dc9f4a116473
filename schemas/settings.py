"""Settings for every role, read once from LEADSTREAM_* environment variables.

One flat, frozen object so that a newcomer finds every knob in one place; the README's configuration
table is generated from the same names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MAX_RECORD_BYTES = 1_000_000  # just under Kafka's default 1 MiB message.max.bytes, with room for headers


def _env(name: str, default: str) -> str:
    return os.environ.get(f"LEADSTREAM_{name.upper()}", default)


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default. Env var = LEADSTREAM_ + the upper-cased field name."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    kafka_sasl_mechanism: str = "PLAIN"  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (with SASL_*)
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""  # CA bundle to verify the broker (with SSL / SASL_SSL); empty: system CAs
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
    company_provider_url: str = ""  # enrichment service for unknown account domains, with {domain}; empty: none
    company_provider_token: str = ""  # sent to it as "Authorization: Bearer <token>"
    company_provider_per_minute: int = 60  # look-ups a minute, per worker process with the raw processor
    company_provider_timeout_ms: int = 2000

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
        security = KafkaSecurity(self.kafka_security_protocol, self.kafka_sasl_mechanism, self.kafka_sasl_username,
                                 self.kafka_sasl_password, self.kafka_ssl_cafile)
        return KafkaConfig(self.kafka_bootstrap, self.topic_prefix, self.partitions, self.max_record_bytes, security)

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
class KafkaSecurity:
    """How LeadStream's Kafka clients authenticate and encrypt: one place, so that every client (processors,
    sinks, admin, the API's producer, Faust) connects the same way."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    username: str = ""
    password: str = field(default="", repr=False)
    cafile: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in KAFKA_PROTOCOLS:
            raise ValueError(f"LEADSTREAM_KAFKA_SECURITY_PROTOCOL={self.protocol!r}: use one of {', '.join(KAFKA_PROTOCOLS)}")
        if self.protocol.startswith("SASL_") and self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"LEADSTREAM_KAFKA_SASL_MECHANISM={self.sasl_mechanism!r}: use one of {', '.join(SASL_MECHANISMS)}")

    def aiokafka_options(self) -> dict:
        """Keyword arguments for every aiokafka client (consumer, producer, admin)."""
        options: dict = {"security_protocol": self.protocol}
        if self.protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context
            options["ssl_context"] = create_ssl_context(cafile=self.cafile or None)
        if self.protocol.startswith("SASL_"):
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                           sasl_plain_password=self.password)
        return options

    def librdkafka_options(self) -> dict:
        """The same for confluent-kafka (librdkafka) clients."""
        options = {"security.protocol": self.protocol}
        if self.cafile:
            options["ssl.ca.location"] = self.cafile
        if self.protocol.startswith("SASL_"):
            options.update({"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.username,
                            "sasl.password": self.password})
        return options


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaConfig:
    """What the Kafka adapters need: where the broker is and how topics are named and partitioned."""

    bootstrap: str
    topic_prefix: str = ""
    partitions: int = 4
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES  # key + value of one produced record, at most
    security: KafkaSecurity = KafkaSecurity()

    def client_options(self) -> dict:
        """What every aiokafka client is constructed with: where the broker is and how to connect."""
        return {"bootstrap_servers": self.bootstrap, **self.security.aiokafka_options()}

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
    """How much a processor takes from Kafka at once: at most `size` messages, waiting at most `wait_ms`."""

    size: int = 2000
    wait_ms: int = 100
