"""Settings for every role, read once from LEADSTREAM_* environment variables.

One flat, frozen object so that a newcomer finds every knob in one place; the README's configuration
table is generated from the same names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from schemas.privacy import ConsentPolicy, IpPolicy, PrivacyPolicy, RetentionPolicy

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MAX_RECORD_BYTES = 1_000_000  # just under Kafka's default 1 MiB message.max.bytes, with room for headers


def _env(name: str, default: str) -> str:
    return os.environ.get(f"LEADSTREAM_{name.upper()}", default)


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default. Env var = LEADSTREAM_ + the upper-cased field name."""

    kafka_bootstrap: str = "127.0.0.1:9092"  # one broker, or a list: host1:9092,host2:9092,host3:9092
    kafka_replication_factor: int = 1  # copies of each topic `migrate` creates (3 on a cluster; README "Scaling out")
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    kafka_sasl_mechanism: str = "PLAIN"  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (with SASL_*)
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_ssl_cafile: str = ""  # CA bundle to verify the broker (with SSL / SASL_SSL); empty: system CAs
    topic_prefix: str = ""
    partitions: int = 4
    clickhouse_host: str = "127.0.0.1"
    clickhouse_port: int = 9000
    clickhouse_http_port: int = 8123
    clickhouse_database: str = "leadstream"
    clickhouse_user: str = "default"
    clickhouse_password: str = field(default="", repr=False)
    clickhouse_cluster: str = ""  # a cluster in the servers' remote_servers: sharded tables (README "Scaling out")
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
    api_keys: str = field(default="", repr=False)  # "site:key" (read-write), "site:key:ro" (read-only), ...
    erasure_key: str = field(default="", repr=False)  # HMAC key of the erasure ledger's emails; unset: generated once, kept in Redis
    server_secret: str = field(default="", repr=False)  # signs stream tokens, names keys in actors; unset: generated once, kept in Redis
    api_max_body_bytes: int = 262_144  # larger request bodies are refused (413)
    api_max_board_cards: int = 2_000  # cards one board page may read: ?limit x stages is cut to this
    api_max_account_leads: int = 1_000  # leads an account's lists (and its panel's click-stream) cover
    api_query_max_seconds: int = 10  # ClickHouse max_execution_time of every API query
    api_query_max_memory_bytes: int = 2_000_000_000  # ClickHouse max_memory_usage of every API query
    api_max_streams: int = 200  # open board streams per API process (the size of their Redis pool)
    api_max_streams_per_key: int = 10  # open board streams per API key (429 beyond)
    max_rules_per_site: int = 500
    max_boards_per_site: int = 50
    max_webhook_actions_per_site: int = 50
    company_provider_url: str = ""  # enrichment service for unknown account domains, with {domain}; empty: none
    company_provider_token: str = field(default="", repr=False)  # sent to it as "Authorization: Bearer <token>"
    company_provider_per_minute: int = 60  # look-ups a minute, per worker process with the raw processor
    company_provider_timeout_ms: int = 2000
    # Webhooks go to public addresses only; these hosts and networks (comma-separated: crm.internal,
    # 10.1.0.0/16, 127.0.0.1) are allowed besides. Read by the webhooks processor and wherever rules are stored.
    webhook_allowed_targets: str = ""
    ip_keep_full: int = 0  # 1: store whole IP addresses; 0: only their network part (the prefixes below)
    ipv4_prefix: int = 24  # bits of an IPv4 address kept (203.0.113.57 -> 203.0.113.0)
    ipv6_prefix: int = 48  # bits of an IPv6 address kept (2001:db8:1:2::7 -> 2001:db8:1::)
    consent_required_sites: str = ""  # sites whose events must state marketing consent to identify: ids, or *
    retention_events_days: int = 395  # days each table keeps its rows (0: until erased); README "Retention"
    retention_sessions_days: int = 395
    retention_identity_events_days: int = 395
    retention_lead_changes_days: int = 395
    retention_rule_executions_days: int = 395
    retention_webhook_deliveries_days: int = 90
    retention_dlq_days: int = 30
    retention_stage_changes_days: int = 0

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
        return KafkaConfig(self.kafka_bootstrap, self.topic_prefix, self.partitions, self.max_record_bytes, security,
                           self.kafka_replication_factor)

    def clickhouse(self) -> ClickHouseConfig:
        return ClickHouseConfig(self.clickhouse_host, self.clickhouse_port, self.clickhouse_database,
                                self.clickhouse_user, self.clickhouse_password, self.clickhouse_cluster)

    def privacy(self) -> PrivacyPolicy:
        if self.ip_keep_full not in (0, 1):
            raise ValueError(f"LEADSTREAM_IP_KEEP_FULL={self.ip_keep_full}: use 0 (network part only) "
                             "or 1 (whole address)")
        return PrivacyPolicy(IpPolicy(self.ipv4_prefix, self.ipv6_prefix, bool(self.ip_keep_full)),
                             ConsentPolicy.parse(self.consent_required_sites))

    def retention(self) -> RetentionPolicy:
        """Days per table, from the retention_<table>_days settings."""
        prefix, suffix = "retention_", "_days"
        return RetentionPolicy({f.name[len(prefix):-len(suffix)]: getattr(self, f.name) for f in fields(self)
                                if f.name.startswith(prefix) and f.name.endswith(suffix)})

    def batch(self) -> BatchConfig:
        return BatchConfig(self.worker_batch_size, self.worker_batch_ms)

    def definition_limits(self) -> DefinitionLimits:
        return DefinitionLimits(self.max_rules_per_site, self.max_boards_per_site, self.max_webhook_actions_per_site)

    def api_key_entries(self) -> list[ApiKeyEntry]:
        """LEADSTREAM_API_KEYS as entries; ValueError naming the setting if an entry is malformed."""
        entries = []
        for number, item in enumerate(filter(None, (part.strip() for part in self.api_keys.split(","))), 1):
            site, _, key = item.partition(":")
            key, read_only = (key[:-3], True) if key.endswith(":ro") else (key, False)
            if not site or not key:
                raise ValueError(f"LEADSTREAM_API_KEYS: entry {number} is not site:key or site:key:ro")
            entries.append(ApiKeyEntry(site, key, read_only))
        return entries

    def refuse_weak_secrets(self, *, api: bool = False) -> None:
        """Raises WeakSecret (one line, naming the setting, never the value) when a password in use is a
        placeholder or short; with `api`, also for the API keys and the server secret (required)."""
        passwords = {"LEADSTREAM_CLICKHOUSE_PASSWORD": self.clickhouse_password,
                     "LEADSTREAM_REDIS_URL": urlsplit(self.redis_url).password or "",
                     "LEADSTREAM_KAFKA_SASL_PASSWORD": self.kafka_sasl_password}
        for name, value in passwords.items():
            if value:  # empty: the server has no password (the local stack)
                _refuse_weak(name, "its password", value, MIN_PASSWORD_CHARS)
        if self.erasure_key:  # unset: generated once and kept in Redis (sinks/erasure.py)
            _refuse_weak("LEADSTREAM_ERASURE_KEY", "the key", self.erasure_key, MIN_SERVER_SECRET_CHARS)
        if not api:
            return
        if self.server_secret:  # unset: the API makes a random one, kept in Redis (api/keys.py)
            _refuse_weak("LEADSTREAM_SERVER_SECRET", "the secret", self.server_secret, MIN_SERVER_SECRET_CHARS)
        for number, entry in enumerate(self.api_key_entries(), 1):
            _refuse_weak("LEADSTREAM_API_KEYS", f"the key of entry {number} (site {entry.site!r})", entry.key,
                         MIN_API_KEY_CHARS)

    @property
    def kafka_port(self) -> int:
        """The first broker's port (the local stack's only one)."""
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def redis_port(self) -> int:
        return int(self.redis_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


MIN_API_KEY_CHARS = 16
MIN_SERVER_SECRET_CHARS = 32
MIN_PASSWORD_CHARS = 16
# Values that say "replace me" (compared without case, '-', '_' and spaces): example files and tutorials.
PLACEHOLDERS = frozenset(("changeme", "change", "replaceme", "password", "passwd", "secret", "default", "example",
                          "test", "admin", "key", "apikey", "todo", "xxx", "none", "null"))


class WeakSecret(ValueError):
    """A secret setting a role refuses to start with: its message is one line naming the setting."""


def _refuse_weak(setting: str, what: str, value: str, min_chars: int) -> None:
    folded = "".join(ch for ch in value.lower() if ch not in "-_ ")
    if folded in PLACEHOLDERS or "changeme" in folded or len(set(value)) == 1:
        raise WeakSecret(f"{setting}: {what} is a placeholder; use a long random value (openssl rand -hex 24)")
    if len(value) < min_chars:
        raise WeakSecret(f"{setting}: {what} is shorter than {min_chars} characters; use a long random value "
                         "(openssl rand -hex 24)")


@dataclass(frozen=True)
class ApiKeyEntry:
    """One entry of LEADSTREAM_API_KEYS: a key for one site, read-write unless `read_only`."""

    site: str
    key: str = field(repr=False)
    read_only: bool = False


@dataclass(frozen=True)
class DefinitionLimits:
    """How many rules, boards and webhook actions one site may have (a write that would exceed one is refused)."""

    rules: int = 500
    boards: int = 50
    webhook_actions: int = 50


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
    replication_factor: int = 1  # of the topics `migrate` creates

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
    cluster: str = ""  # '': one server; else each table is a `Distributed` table over its shards' `<table>_local`


@dataclass(frozen=True)
class BatchConfig:
    """How much a processor takes from Kafka at once: at most `size` messages, waiting at most `wait_ms`."""

    size: int = 2000
    wait_ms: int = 100
