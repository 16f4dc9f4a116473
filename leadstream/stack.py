"""The local stack: real Apache Kafka (KRaft), ClickHouse and Redis as plain processes on 127.0.0.1.

No Docker needed. Kafka's jars come from Maven Central through `deploy/kafka/pom.xml` into a cache
directory; ClickHouse and Redis are Debian's packages (installed with apt when missing). Every server
keeps its data, config, log and pid file under the stack directory, so `down` stops only what `up`
started and `up` is idempotent.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
        if self.pid():
            self._wait_ready()
            print(f"  {self.name:<10} already up on 127.0.0.1:{self.port}", flush=True)
            return
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
        started = time.monotonic()
        self._wait_ready()
        print(f"  {self.name:<10} up on 127.0.0.1:{self.port} in {time.monotonic() - started:.1f}s", flush=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.ready():
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
    return settings.kafka_port + 2


def _kafka(settings: Settings, root: Path) -> Server:
    data = root / "kafka"
    libs = Path(settings.cache_dir) / f"kafka-{settings.kafka_version}" / "libs"
    controller_port = settings.kafka_port + 1

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
        _render(DEPLOY_LOCAL / "kafka-server.properties", props, data=data, port=settings.kafka_port,
                controller_port=controller_port, partitions=settings.partitions, sasl_port=local_sasl_port(settings),
                sasl_user=LOCAL_SASL_USER, sasl_password=LOCAL_SASL_PASSWORD)
        shutil.copy(DEPLOY_LOCAL / "kafka-log4j.properties", data / "log4j.properties")
        if not (data / "kafka-logs" / "meta.properties").exists():
            format_kafka_storage(libs, props, base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))

    def command() -> list[str]:
        return [
            "java", "-Xms512m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={data}", f"-Dlog4j.configuration=file:{data / 'log4j.properties'}",
            "-cp", f"{libs}/*", "kafka.Kafka", str(data / "server.properties"),
        ]

    def ready() -> bool:
        return _port_open(settings.kafka_port) and _kafka_answers(settings.kafka_bootstrap)

    return Server("kafka", settings.kafka_port, install, command, ready, data, startup_timeout_s=120)



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


def _clickhouse(settings: Settings, root: Path) -> Server:
    data = root / "clickhouse"

    def install() -> None:
        if shutil.which("clickhouse-server") is None and shutil.which("clickhouse") is None:
            _apt_install("clickhouse-server", "clickhouse-client")
        for sub in ("data", "tmp", "user_files", "format_schemas"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        _render(DEPLOY_LOCAL / "clickhouse-config.xml", data / "config.xml", data=data,
                tcp_port=settings.clickhouse_port, http_port=settings.clickhouse_http_port)
        shutil.copy(DEPLOY_LOCAL / "clickhouse-users.xml", data / "users.xml")

    def command() -> list[str]:
        binary = shutil.which("clickhouse-server")
        base = [binary] if binary else [shutil.which("clickhouse") or "clickhouse", "server"]
        return base + [f"--config-file={data / 'config.xml'}"]

    def ready() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{settings.clickhouse_http_port}/?query=SELECT%201", timeout=2) as r:
                return r.read().strip() == b"1"
        except OSError:
            return False

    return Server("clickhouse", settings.clickhouse_port, install, command, ready, data)


def _redis(settings: Settings, root: Path) -> Server:
    data = root / "redis"

    def install() -> None:
        if shutil.which("redis-server") is None:
            _apt_install("redis-server")
        _render(DEPLOY_LOCAL / "redis.conf", data / "redis.conf", data=data, port=settings.redis_port)

    def command() -> list[str]:
        return [shutil.which("redis-server") or "redis-server", str(data / "redis.conf")]

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", settings.redis_port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return Server("redis", settings.redis_port, install, command, ready, data)


def servers(settings: Settings) -> list[Server]:
    root = Path(settings.stack_dir)
    return [_redis(settings, root), _clickhouse(settings, root), _kafka(settings, root)]


def up(settings: Settings) -> None:
    print(f"Starting the local stack in {settings.stack_dir}", flush=True)
    for server in servers(settings):
        server.up()


def down(settings: Settings) -> None:
    from leadstream.runner import stop_detached

    for pid_file in sorted((Path(settings.stack_dir) / "roles").glob("*.pid")):
        stop_detached(pid_file)
        print(f"  {pid_file.stem:<10} stopped", flush=True)
    for server in reversed(servers(settings)):
        server.down()


def status(settings: Settings) -> bool:
    all_up = True
    for server in servers(settings):
        state = server.status()
        all_up &= state.startswith("up")
        print(f"  {server.name:<10} {state}")
    return all_up


def main_stack(action: str, settings: Settings) -> int:
    try:
        if action == "up":
            up(settings)
        elif action == "down":
            down(settings)
        else:
            return 0 if status(settings) else 1
    except StackError as err:
        print(f"leadstream stack {action}: {err}", file=sys.stderr)
        return 2
    return 0
