"""The deployment files, checked the way Compose and the servers will read them (no Docker here): every
published port is on loopback, the servers get passwords from the env file and the LeadStream roles the
same passwords, a missing password stops Compose, webhook secrets reach only the service that signs
webhooks, secrets stay out of git and the image, the image runs its roles as an unprivileged user, and the
local stack's servers listen on 127.0.0.1 only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
import yaml

from processors.app import LAYOUTS
from schemas.rules import WEBHOOK_SECRET_PREFIX, webhook_secret_problem
from schemas.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ROLES = [name for name, service in SERVICES.items() if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"]
ENV_FILE = "deploy/leadstream.env"
WEBHOOK_SECRETS_FILE = "deploy/webhook-secrets.env"
VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::(?P<op>[-?])(?P<arg>[^}]*))?\}")
SETTINGS = {f"LEADSTREAM_{name.upper()}" for name in Settings.__dataclass_fields__}


def env_file(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


EXAMPLE = env_file((ROOT / "deploy" / "leadstream.env.example").read_text())
SECRETS_EXAMPLE = env_file((ROOT / "deploy" / "webhook-secrets.env.example").read_text())
CHOSEN = {"LEADSTREAM_CLICKHOUSE_PASSWORD": "c1ick", "REDIS_PASSWORD": "r3dis", "LEADSTREAM_API_KEYS": "s:k"}


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} over a value of the file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == "?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == "-" else ""

    return VARIABLE.sub(one, value)


def test_every_published_port_is_on_loopback_by_default():
    published = {name: interpolate(service.get("ports", []), {}) for name, service in SERVICES.items()}
    assert {port for ports in published.values() for port in ports} == {
        "127.0.0.1:9092:9092", "127.0.0.1:9000:9000", "127.0.0.1:8123:8123", "127.0.0.1:6379:6379", "127.0.0.1:8000:8000"}


def test_the_servers_and_the_roles_share_the_passwords_of_the_env_file():
    resolved = interpolate(SERVICES, CHOSEN)
    assert resolved["clickhouse"]["environment"] == {"CLICKHOUSE_PASSWORD": "c1ick"}
    assert "CLICKHOUSE_SKIP_USER_SETUP" not in str(resolved)
    assert resolved["redis"]["command"][-2:] == ["--requirepass", "r3dis"]
    for role in ROLES:
        service = resolved[role]
        assert env_files(service)[0] == ENV_FILE, role  # LEADSTREAM_CLICKHOUSE_PASSWORD and the API keys
        pool = redis.Redis.from_url(service["environment"]["LEADSTREAM_REDIS_URL"]).connection_pool
        assert (pool.connection_kwargs["password"], pool.connection_kwargs["host"]) == ("r3dis", "redis"), role
        assert {*service["environment"], *CHOSEN} & SETTINGS >= {"LEADSTREAM_CLICKHOUSE_PASSWORD",
                                                                 "LEADSTREAM_REDIS_URL", "LEADSTREAM_API_KEYS"}
    assert set(ROLES) == {"migrate", "worker", "automation", "sink", "api"}


def env_files(service: dict) -> list[str]:
    files = service.get("env_file", [])
    return [files] if isinstance(files, str) else files


def test_webhook_secrets_reach_only_the_service_that_signs_webhooks():
    signing = [role for role in ROLES if "webhooks" in " ".join(SERVICES[role]["command"])]
    assert signing == ["automation"]
    assert {role: env_files(SERVICES[role]) for role in ROLES if WEBHOOK_SECRETS_FILE in env_files(SERVICES[role])} \
        == {"automation": [ENV_FILE, WEBHOOK_SECRETS_FILE]}
    assert all(not name.startswith(WEBHOOK_SECRET_PREFIX) for name in EXAMPLE)  # not in the file every role gets


def test_the_webhook_secrets_example_holds_only_site_secrets_for_the_example_site():
    site = EXAMPLE["LEADSTREAM_API_KEYS"].split(":")[0]
    assert SECRETS_EXAMPLE and all(webhook_secret_problem(site, name) is None for name in SECRETS_EXAMPLE)
    assert all(value == "change-me" for value in SECRETS_EXAMPLE.values())
    assert not set(SECRETS_EXAMPLE) & SETTINGS


def test_the_compose_workers_run_every_processor_once_the_way_the_demo_does():
    commands = [SERVICES[name]["command"] for name in ROLES if SERVICES[name]["command"][0] == "worker"]
    assert [tuple(command[2].split(",")) for command in commands] == list(LAYOUTS["split"].values())
    assert [command[1] for command in commands] == ["--processors"] * len(commands)


@pytest.mark.parametrize("missing", ["LEADSTREAM_CLICKHOUSE_PASSWORD", "REDIS_PASSWORD"])
def test_compose_refuses_to_start_without_a_password(missing):
    with pytest.raises(ValueError, match=missing):
        interpolate(SERVICES, {name: value for name, value in CHOSEN.items() if name != missing})


def test_the_example_env_file_names_exactly_what_compose_and_the_roles_read():
    required = {m["name"] for m in VARIABLE.finditer((ROOT / "docker-compose.yml").read_text()) if m["op"] != "-"}
    assert required <= set(EXAMPLE)
    assert set(EXAMPLE) - required <= SETTINGS  # the rest is read by the roles as settings
    assert all(value.startswith("change-me") or value.endswith(":change-me") for value in EXAMPLE.values())


def test_every_reference_in_compose_resolves():
    for name, service in SERVICES.items():
        assert set(service.get("depends_on", {})) <= set(SERVICES), name
        assert service.get("image") or (ROOT / service["build"]["dockerfile"]).is_file(), name


def test_secrets_stay_out_of_git_and_out_of_the_image():
    for secrets in (ENV_FILE, WEBHOOK_SECRETS_FILE):
        assert secrets in (ROOT / ".gitignore").read_text().splitlines()
        assert secrets in (ROOT / ".dockerignore").read_text().splitlines()


def test_the_image_runs_the_roles_as_an_unprivileged_user():
    """The last USER of the Dockerfile is a named, non-root user, and nothing runs after it as root; the
    directory the roles write to (LEADSTREAM_STACK_DIR) is that user's."""
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")  # continued lines as one
    lines = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    users = [i for i, (instruction, _) in enumerate(lines) if instruction == "USER"]
    assert users, "the image must not run as root"
    user = lines[users[-1]][1].split(":")[0].strip()
    assert user not in ("root", "0") and not user.isdigit()
    assert [instruction for instruction, _ in lines[users[-1] + 1:]] == ["ENTRYPOINT", "CMD"]
    env = " ".join(rest for instruction, rest in lines if instruction == "ENV")
    stack_dir = re.search(r"LEADSTREAM_STACK_DIR=(\S+)", env)[1]
    setup = " ".join(rest for instruction, rest in lines if instruction == "RUN")
    assert "useradd" in setup and f"chown {user}:{user} {stack_dir}" in setup


def test_the_local_stack_servers_listen_on_loopback_only():
    local = ROOT / "deploy" / "local"
    kafka = env_file((local / "kafka-server.properties").read_text())
    for listener in kafka["listeners"].split(",") + kafka["advertised.listeners"].split(","):
        assert listener.split("://")[1].startswith("127.0.0.1:"), listener
    clickhouse = (local / "clickhouse-config.xml").read_text()
    assert re.findall(r"<listen_host>(.*?)</listen_host>", clickhouse) == ["127.0.0.1"]
    assert re.findall(r"<ip>(.*?)</ip>", (local / "clickhouse-users.xml").read_text()) == ["127.0.0.1", "::1"]
    redis_conf = [line.split() for line in (local / "redis.conf").read_text().splitlines() if line.strip()]
    assert ["bind", "127.0.0.1"] in redis_conf and ["protected-mode", "yes"] in redis_conf


def rendered_kafka(node, tmp_path: Path) -> dict[str, str]:
    from leadstream import stack

    target = tmp_path / f"server-{node.node_id}.properties"
    stack.render_kafka_config(node, target, tmp_path, partitions=4)
    return env_file(target.read_text())


def test_the_cluster_stack_never_meets_the_single_server_one_and_replicates_each_write_twice(tmp_path):
    from leadstream import stack

    single = Settings()
    cluster = stack.cluster_settings(single)
    assert cluster.stack_dir != single.stack_dir and cluster.kafka_replication_factor == 3
    single_ports = {server.port for server in stack.servers(single)} | {9093, 9094, single.clickhouse_http_port}
    cluster_servers = stack.servers(cluster, cluster=True)  # 3 brokers, 2 Redis, 2 ClickHouse shards
    cluster_ports = {server.port for server in cluster_servers} | {p + d for p in stack.CLUSTER_KAFKA_PORTS
                                                                   for d in (1, 2)} | {
        http for _, http in stack.CLUSTER_CLICKHOUSE_SHARDS}
    assert not single_ports & cluster_ports and len(cluster_servers) == 7
    assert [f"127.0.0.1:{port}" for port in stack.CLUSTER_KAFKA_PORTS] == cluster.kafka_bootstrap.split(",")

    voters = ",".join(f"{i}@127.0.0.1:{port + 1}" for i, port in enumerate(stack.CLUSTER_KAFKA_PORTS, 1))
    for node_id, port in enumerate(stack.CLUSTER_KAFKA_PORTS, 1):
        config = rendered_kafka(stack.KafkaNode(node_id, port, voters, 3, 2), tmp_path)
        assert config["node.id"] == str(node_id) and config["controller.quorum.voters"] == voters
        assert config["default.replication.factor"] == config["offsets.topic.replication.factor"] == "3"
        assert config["min.insync.replicas"] == config["transaction.state.log.min.isr"] == "2"
    lone = rendered_kafka(stack._single_kafka_node(single), tmp_path)  # the single broker: as before
    assert lone["node.id"] == "1" and lone["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert lone["default.replication.factor"] == lone["min.insync.replicas"] == "1"
