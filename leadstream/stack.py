"""The local stack: real Apache Kafka (KRaft), ClickHouse and Redis as plain processes on 127.0.0.1.

No Docker needed. Kafka's jars come from Maven Central through `deploy/kafka/pom.xml` into a cache
directory; ClickHouse and Redis are Debian's packages (installed with apt when missing). Every server
keeps its data, config, log and pid file under the stack directory, so `down` stops only what `up`
started and `up` is idempotent.

`--cluster`: a second stack, on ports and in a directory of its own (`cluster_settings`), for the fault tests
of tests/cluster: three Kafka nodes (replication factor 3, min.insync.replicas 2), a Redis primary with a
replica (`promote-redis` fails over to it) and two ClickHouse servers, the two shards of the cluster
`leadstream` (clients get LEADSTREAM_CLICKHOUSE_CLUSTER=leadstream: sinks/clickhouse.py's sharded tables).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from schemas.settings import REPO_ROOT, Settings

DEPLOY_LOCAL = REPO_ROOT / "deploy" / "local"


class StackError(RuntimeError):
    """A one-line, user-facing reason why the stack cannot start."""


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited child not yet reaped) is not alive
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _render(template: Path, target: Path, **values: object) -> None:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    target.write_text(text)


def _apt_install(*packages: str) -> None:
    if shutil.which("apt-get") is None:
        raise StackError(f"{packages[0]} is missing and apt-get is not available; install {' '.join(packages)} yourself")
    print(f"  installing {' '.join(packages)} with apt-get (once) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run(sudo + ["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
    result = subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *packages], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StackError(f"apt-get install {' '.join(packages)} failed: {tail[0]}")


@dataclass
class Server:
    """One server process of the stack: how to install, configure, start and probe it."""

    name: str
    port: int
    install: Callable[[], None]
    command: Callable[[], list[str]]
    ready: Callable[[], bool]
    data_dir: Path
    startup_timeout_s: float = 90.0

    @property
    def pid_file(self) -> Path:
        return self.data_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / f"{self.name}.out"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def status(self) -> str:
        pid = self.pid()
        if pid and self.ready():
            return f"up (pid {pid}, 127.0.0.1:{self.port})"
        if pid:
            return f"starting or unhealthy (pid {pid}, 127.0.0.1:{self.port}; log {self.log_file})"
        if _port_open(self.port):
            return f"port {self.port} is taken by a process this stack did not start"
        return "down"

    def up(self) -> None:
        self.wait_ready(self.start())

    def start(self) -> float | None:
        """Spawn the server unless it runs, without waiting for it: when it was spawned (None: it ran already).
        A cluster's brokers start together, since none answers before a quorum of them is up."""
        if self.pid():
            return None
        if _port_open(self.port):
            raise StackError(
                f"port {self.port} for {self.name} is taken by another process; stop it or set the port via LEADSTREAM_* env vars"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.install()
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.data_dir,
            )
        self.pid_file.write_text(str(proc.pid))
        return time.monotonic()

    def wait_ready(self, started: float | None) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.ready():
                if started is None:
                    print(f"  {self.name:<10} already up on 127.0.0.1:{self.port}", flush=True)
                else:
                    print(f"  {self.name:<10} up on 127.0.0.1:{self.port} in {time.monotonic() - started:.1f}s", flush=True)
                return
            if not self.pid():
                tail = self.log_file.read_text(errors="replace").strip().splitlines()[-3:] if self.log_file.exists() else []
                raise StackError(f"{self.name} exited during startup: {' | '.join(tail) or 'no output'} (log {self.log_file})")
            time.sleep(0.3)
        raise StackError(f"{self.name} did not answer within {self.startup_timeout_s:.0f}s (log {self.log_file})")

    def down(self) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        print(f"  {self.name:<10} stopped", flush=True)


LOCAL_SASL_USER, LOCAL_SASL_PASSWORD = "leadstream", "local-stack-only"
"""The local broker's SASL/PLAIN listener account: public, for trying the Kafka security settings."""


def local_sasl_port(settings: Settings) -> int:
    """The local broker's SASL_PLAINTEXT listener: next to its PLAINTEXT one and its controller."""
    return _single_kafka_node(settings).sasl_port


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node (broker and controller in one process): its id, ports and the quorum it votes in."""

    node_id: int
    port: int
    voters: str  # controller.quorum.voters: id@host:controller_port, ...
    replication_factor: int = 1
    min_insync_replicas: int = 1

    @property
    def controller_port(self) -> int:
        return self.port + 1

    @property
    def sasl_port(self) -> int:
        return self.port + 2


def _single_kafka_node(settings: Settings) -> KafkaNode:
    return KafkaNode(1, settings.kafka_port, f"1@127.0.0.1:{settings.kafka_port + 1}")


def _new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def render_kafka_config(node: KafkaNode, target: Path, data: Path, partitions: int) -> None:
    """The node's server.properties, from deploy/local's template."""
    _render(DEPLOY_LOCAL / "kafka-server.properties", target, data=data, port=node.port, node_id=node.node_id,
            voters=node.voters, controller_port=node.controller_port, partitions=partitions,
            sasl_port=node.sasl_port, sasl_user=LOCAL_SASL_USER, sasl_password=LOCAL_SASL_PASSWORD,
            replication_factor=node.replication_factor, min_insync_replicas=node.min_insync_replicas)


def _kafka(settings: Settings, data: Path, node: KafkaNode, name: str = "kafka",
           cluster_id: Callable[[], str] = _new_cluster_id) -> Server:
    """A Kafka node; `cluster_id`: the id its storage is formatted with (a cluster's nodes share one)."""
    libs = Path(settings.cache_dir) / f"kafka-{settings.kafka_version}" / "libs"

    def install() -> None:
        if shutil.which("java") is None:
            raise StackError("Java is missing: Kafka needs a Java 17+ runtime (apt-get install openjdk-17-jre-headless)")
        if not (libs.is_dir() and any(libs.glob("kafka_2.13-*.jar"))):
            if shutil.which("mvn") is None:
                raise StackError("Maven (mvn) is missing: it fetches Kafka's jars (apt-get install maven)")
            print(f"  fetching Apache Kafka {settings.kafka_version} jars from Maven Central (once) ...", flush=True)
            result = subprocess.run(
                ["mvn", "-q", "-B", "-f", str(REPO_ROOT / "deploy" / "kafka" / "pom.xml"),
                 f"-Dkafka.version={settings.kafka_version}", "dependency:copy-dependencies",
                 f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                shutil.rmtree(libs, ignore_errors=True)
                tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
                raise StackError(f"fetching Kafka jars with mvn failed: {tail[0]}")
        props = data / "server.properties"
        render_kafka_config(node, props, data, settings.partitions)
        shutil.copy(DEPLOY_LOCAL / "kafka-log4j.properties", data / "log4j.properties")
        if not (data / "kafka-logs" / "meta.properties").exists():
            format_kafka_storage(libs, props, cluster_id())

    def command() -> list[str]:
        return [
            "java", "-Xms512m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={data}", f"-Dlog4j.configuration=file:{data / 'log4j.properties'}",
            "-cp", f"{libs}/*", "kafka.Kafka", str(data / "server.properties"),
        ]

    def ready() -> bool:
        return _port_open(node.port) and _kafka_answers(f"127.0.0.1:{node.port}")

    return Server(name, node.port, install, command, ready, data, startup_timeout_s=120)


def format_kafka_storage(libs: Path, props: Path, cluster_id: str) -> None:
    """Format KRaft storage. `--cluster-id=ID` in one argument: a random id may start with '-', which the
    storage tool would otherwise read as an option."""
    result = subprocess.run(
        ["java", "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
         "-c", str(props)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise StackError(f"formatting Kafka storage failed: {result.stderr.strip() or result.stdout.strip()}")

def _kafka_answers(bootstrap: str) -> bool:
    """True when the broker serves metadata (the port alone opens before the controller is elected)."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())


def _clickhouse(data: Path, tcp_port: int, http_port: int, name: str = "clickhouse",
                shards: Sequence[int] = ()) -> Server:
    """A ClickHouse server; `shards`: the TCP ports of a cluster's shards (this one among them), which its
    config names as the cluster `CLICKHOUSE_CLUSTER` for its Distributed tables."""

    def install() -> None:
        if shutil.which("clickhouse-server") is None and shutil.which("clickhouse") is None:
            _apt_install("clickhouse-server", "clickhouse-client")
        for sub in ("data", "tmp", "user_files", "format_schemas"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        _render(DEPLOY_LOCAL / "clickhouse-config.xml", data / "config.xml", data=data, tcp_port=tcp_port,
                http_port=http_port, remote_servers=remote_servers(CLICKHOUSE_CLUSTER, shards) if shards else "")
        shutil.copy(DEPLOY_LOCAL / "clickhouse-users.xml", data / "users.xml")

    def command() -> list[str]:
        binary = shutil.which("clickhouse-server")
        base = [binary] if binary else [shutil.which("clickhouse") or "clickhouse", "server"]
        return base + [f"--config-file={data / 'config.xml'}"]

    def ready() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/?query=SELECT%201", timeout=2) as r:
                return r.read().strip() == b"1"
        except OSError:
            return False

    return Server(name, tcp_port, install, command, ready, data)


def remote_servers(cluster: str, shard_ports: Sequence[int]) -> str:
    """A `remote_servers` config section: one shard of one replica per port, on 127.0.0.1."""
    shards = "".join(f"<shard><replica><host>127.0.0.1</host><port>{port}</port></replica></shard>"
                     for port in shard_ports)
    return f"<remote_servers><{cluster}>{shards}</{cluster}></remote_servers>"


def _redis(data: Path, port: int, name: str = "redis", primary: Callable[[], int | None] = lambda: None) -> Server:
    """A Redis server; `primary`: the port of the primary it follows (`replicaof`), None when it is one. Asked
    at each start, so a former primary that comes back after a promotion follows the new one."""

    def install() -> None:
        if shutil.which("redis-server") is None:
            _apt_install("redis-server")
        config = data / "redis.conf"
        _render(DEPLOY_LOCAL / "redis.conf", config, data=data, port=port)
        if (primary_port := primary()) not in (None, port):
            with config.open("a") as conf:
                conf.write(f"replicaof 127.0.0.1 {primary_port}\n")

    def command() -> list[str]:
        return [shutil.which("redis-server") or "redis-server", str(data / "redis.conf")]

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return Server(name, port, install, command, ready, data)


def servers(settings: Settings, cluster: bool = False) -> list[Server]:
    """The single-server stack's servers, or (`cluster`, with `cluster_settings`) the cluster stack's."""
    if cluster:
        return cluster_servers(settings)
    root = Path(settings.stack_dir)
    return [_redis(root / "redis", settings.redis_port),
            _clickhouse(root / "clickhouse", settings.clickhouse_port, settings.clickhouse_http_port),
            _kafka(settings, root / "kafka", _single_kafka_node(settings))]


CLUSTER_KAFKA_PORTS = (19092, 19192, 19292)  # each node's controller listens on port + 1, its SASL one on + 2
CLUSTER_REDIS_PORTS = (16379, 16380)  # the first is the primary until `stack promote-redis --cluster`
CLUSTER_CLICKHOUSE_SHARDS = ((19000, 18123), (19010, 18133))  # (TCP, HTTP) of each shard; clients use the first
CLICKHOUSE_CLUSTER = "leadstream"
CLUSTER_REPLICATION_FACTOR, CLUSTER_MIN_INSYNC_REPLICAS = 3, 2


def cluster_settings(settings: Settings) -> Settings:
    """The cluster stack's settings: ports and a data dir of its own, so that it never meets the single-server
    stack, and Redis at whichever of its two servers is the primary now."""
    stack_dir = f"{settings.stack_dir}-cluster"
    return replace(settings, kafka_bootstrap=",".join(f"127.0.0.1:{port}" for port in CLUSTER_KAFKA_PORTS),
                   kafka_replication_factor=CLUSTER_REPLICATION_FACTOR,
                   redis_url=f"redis://127.0.0.1:{redis_primary_port(Path(stack_dir))}/0",
                   clickhouse_port=CLUSTER_CLICKHOUSE_SHARDS[0][0], clickhouse_http_port=CLUSTER_CLICKHOUSE_SHARDS[0][1],
                   clickhouse_cluster=CLICKHOUSE_CLUSTER,
                   stack_dir=stack_dir)


def redis_primary_port(root: Path) -> int:
    """The cluster's Redis primary, as the last promotion recorded it."""
    try:
        return int((root / "redis-primary").read_text())
    except (OSError, ValueError):
        return CLUSTER_REDIS_PORTS[0]


def cluster_servers(settings: Settings) -> list[Server]:
    """Three KRaft nodes (each a broker and one of three controller voters), a Redis primary and its replica,
    two ClickHouse shards."""
    root = Path(settings.stack_dir)
    voters = ",".join(f"{i}@127.0.0.1:{port + 1}" for i, port in enumerate(CLUSTER_KAFKA_PORTS, 1))
    cluster_id_file = root / "kafka-cluster-id"

    def cluster_id() -> str:
        if not cluster_id_file.exists():
            cluster_id_file.write_text(_new_cluster_id())
        return cluster_id_file.read_text()

    def primary() -> int:
        return redis_primary_port(root)

    kafka = [_kafka(settings, root / f"kafka-{i}", KafkaNode(i, port, voters, CLUSTER_REPLICATION_FACTOR,
                                                             CLUSTER_MIN_INSYNC_REPLICAS), f"kafka-{i}", cluster_id)
             for i, port in enumerate(CLUSTER_KAFKA_PORTS, 1)]
    redis = [_redis(root / f"redis-{port}", port, f"redis-{port}", primary) for port in CLUSTER_REDIS_PORTS]
    tcp_ports = [tcp for tcp, _ in CLUSTER_CLICKHOUSE_SHARDS]
    clickhouse = [_clickhouse(root / f"clickhouse-{i}", tcp, http, f"clickhouse-{i}", tcp_ports)
                  for i, (tcp, http) in enumerate(CLUSTER_CLICKHOUSE_SHARDS, 1)]
    return [*redis, *clickhouse, *kafka]


def promote_redis(settings: Settings) -> int:
    """Make the cluster's Redis replica the primary (`REPLICAOF NO ONE`) and record it, so that `stack env`
    names it and the former primary, started again by `stack up`, follows it; a former primary still running
    (a planned switch-over) follows it at once. Clients are repointed by restarting them with the new
    LEADSTREAM_REDIS_URL: there is no Sentinel here. Returns the new primary's port."""
    import redis

    root = Path(settings.stack_dir)
    old = redis_primary_port(root)
    new = next(port for port in CLUSTER_REDIS_PORTS if port != old)
    redis.Redis(host="127.0.0.1", port=new).replicaof("NO", "ONE")
    (root / "redis-primary").write_text(str(new))
    try:
        redis.Redis(host="127.0.0.1", port=old, socket_connect_timeout=1).replicaof("127.0.0.1", new)
    except redis.ConnectionError:
        pass  # it is down; it follows the new primary when it starts again
    print(f"  redis      primary is now 127.0.0.1:{new} (was {old}); restart clients with "
          f"LEADSTREAM_REDIS_URL=redis://127.0.0.1:{new}/0", flush=True)
    return new


def up(settings: Settings, cluster: bool = False) -> None:
    print(f"Starting the local {'cluster ' if cluster else ''}stack in {settings.stack_dir}", flush=True)
    if not cluster:
        for server in servers(settings):
            server.up()
        return
    Path(settings.stack_dir).mkdir(parents=True, exist_ok=True)
    stack = servers(settings, cluster)  # together: a broker answers only once a quorum of controllers is up
    for server, started in [(server, server.start()) for server in stack]:
        server.wait_ready(started)


def down(settings: Settings, cluster: bool = False) -> None:
    from leadstream.runner import stop_detached

    for pid_file in sorted((Path(settings.stack_dir) / "roles").glob("*.pid")):
        stop_detached(pid_file)
        print(f"  {pid_file.stem:<10} stopped", flush=True)
    for server in reversed(servers(settings, cluster)):
        server.down()


def status(settings: Settings, cluster: bool = False) -> bool:
    all_up = True
    for server in servers(settings, cluster):
        state = server.status()
        all_up &= state.startswith("up")
        print(f"  {server.name:<10} {state}")
    if cluster:
        print(f"  redis primary: 127.0.0.1:{redis_primary_port(Path(settings.stack_dir))}")
    return all_up


CLIENT_SETTINGS = ("kafka_bootstrap", "kafka_replication_factor", "redis_url", "clickhouse_port",
                   "clickhouse_http_port", "clickhouse_cluster", "stack_dir")
"""What the other commands need to be told to run against a stack (`stack env`)."""


def env(settings: Settings) -> None:
    for name in CLIENT_SETTINGS:
        print(f"export LEADSTREAM_{name.upper()}={getattr(settings, name)}")


def main_stack(action: str, settings: Settings, cluster: bool = False) -> int:
    if cluster:
        settings = cluster_settings(settings)
    try:
        if action == "up":
            up(settings, cluster)
        elif action == "down":
            down(settings, cluster)
        elif action == "env":
            env(settings)
        elif action == "promote-redis":
            if not cluster:
                raise StackError("the single-server stack has no Redis replica; use --cluster")
            promote_redis(settings)
        else:
            return 0 if status(settings, cluster) else 1
    except StackError as err:
        print(f"leadstream stack {action}: {err}", file=sys.stderr)
        return 2
    return 0
