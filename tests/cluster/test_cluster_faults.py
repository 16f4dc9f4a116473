"""The pipeline survives the cluster's faults, not just its own process's: a broker SIGKILLed, the Redis primary
SIGKILLed and its lagging replica promoted, a worker cut off from the brokers past its session timeout, a
ClickHouse shard down for 30 s. Each
run ends with exactly what the uninterrupted run stored, and prints what the fault cost."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import redis
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from leadstream import stack
from leadstream.runner import Role
from processors.runtime.ingest import consumer
from schemas.redis_keys import RedisKeys
from schemas.topics import CATALOG, EVENTS_DLQ, EVENTS_ENRICHED, EVENTS_RAW
from sinks.clickhouse import connect, shard_configs
from tests.cluster.conftest import assert_same_outcome, cluster_server, run_with_fault
from tests.integration.conftest import namespace

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BROKER_DOWN_S = 20
REPLICA_BEHIND_S = 3
SHARD_DOWN_S = 30
SESSION_TIMEOUT_S = 10  # aiokafka's default session_timeout_ms, which the ingest keeps
PROCESSORS = ("raw", "lead", "account", "board")  # the ones with state and watermarks


async def _partitions(settings) -> list[dict]:
    admin = AIOKafkaAdminClient(**settings.kafka().client_options())
    await admin.start()
    try:
        topics = [settings.topic(topic.name) for topic in CATALOG] + ["__consumer_offsets"]
        return [partition for topic in await admin.describe_topics(topics) for partition in topic["partitions"]]
    finally:
        await admin.close()


def stop_roles(roles: list[Role]) -> None:
    for role in roles:
        role.stop()


def test_a_broker_sigkilled_mid_stream_costs_a_stall_and_nothing_else(cluster, uninterrupted, roles):
    killed: dict = {}

    def kill_the_busiest_broker(running) -> None:
        leaders = Counter(partition["leader"] for partition in asyncio.run(_partitions(s)))
        node, led = leaders.most_common(1)[0]
        broker = cluster_server(s, f"kafka-{node}")
        pid = broker.pid()
        os.killpg(pid, signal.SIGKILL)
        killed.update(node=node, led=led, of=sum(leaders.values()))
        time.sleep(BROKER_DOWN_S)
        broker.up()  # restarted: it catches up from the others and rejoins every partition's in-sync replicas
        started = time.monotonic()
        while any(len(partition["isr"]) < 3 for partition in asyncio.run(_partitions(s))):
            assert time.monotonic() - started < 120, "the restarted broker did not rejoin the in-sync replicas"
            time.sleep(0.5)
        killed["caught_up_s"] = time.monotonic() - started

    with namespace(cluster) as s:
        run = run_with_fault(s, roles, kill_the_busiest_broker)
        stop_roles(roles)
    print(f"\nbroker kafka-{killed['node']} (leader of {killed['led']} of {killed['of']} partitions) SIGKILLed: "
          f"stall {run.stall_s:.1f} s (uninterrupted run {uninterrupted.stall_s:.1f} s); restarted after "
          f"{BROKER_DOWN_S} s, back in every in-sync replica set {killed['caught_up_s']:.1f} s later")
    assert_same_outcome(run.outcome, uninterrupted.outcome)


def watermarks(url: str, settings) -> dict[tuple[str, int], int]:
    """Each processor's applied offset per input partition, as the Redis server at `url` has it."""
    client, keys = redis.Redis.from_url(url), RedisKeys.of(settings)
    return {(processor, int(field)): int(value) for processor in PROCESSORS
            for field, value in client.hgetall(keys.watermarks(processor)).items() if not field.startswith(b"st:")}


async def _raw_records_handled(settings) -> Counter:
    """How many times the raw processor produced its output (an enriched event or a dead letter) for each raw
    record, as (raw partition, raw offset) -> count, read back from Kafka up to the topics' end offsets."""
    handled: Counter = Counter()
    kafka = settings.kafka()
    reader = consumer(kafka, group=None)
    await reader.start()
    try:
        parts = [TopicPartition(kafka.topic(topic.name), p) for topic in (EVENTS_ENRICHED, EVENTS_DLQ)
                 for p in range(kafka.partitions)]
        reader.assign(parts)
        ends = await reader.end_offsets(parts)
        while unread := [tp for tp in parts if await reader.position(tp) < ends[tp]]:
            for tp, messages in (await reader.getmany(*unread, timeout_ms=1000, max_records=20000)).items():
                for message in messages:
                    record = orjson.loads(message.value)
                    if tp.topic == kafka.topic(EVENTS_ENRICHED.name):
                        handled[record["raw_partition"], record["raw_offset"]] += 1
                    elif record.get("topic") == kafka.topic(EVENTS_RAW.name):
                        handled[record["partition"], record["offset"]] += 1
    finally:
        await reader.stop()
    return handled


def wait_in_sync(replica_port: int, timeout_s: float = 60) -> None:
    """Until the replica's link to its primary is up and it has everything the primary sent."""
    replica = redis.Redis(host="127.0.0.1", port=replica_port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = replica.info("replication")
        if info.get("master_link_status") == "up":
            primary = redis.Redis(host="127.0.0.1", port=info["master_port"]).info("replication")
            if info.get("slave_repl_offset") == primary["master_repl_offset"]:
                return
        time.sleep(0.3)
    raise TimeoutError(f"the Redis replica on {replica_port} did not catch up")


def test_b_redis_primary_sigkilled_and_a_lagging_replica_promoted_ends_exact(cluster, uninterrupted, roles):
    """The replica is frozen (SIGSTOP) for a few seconds before the primary dies, so it lacks the last commits:
    each processor's state and watermarks roll back together (one transaction), and the processors process again,
    from Kafka, every record after their watermark."""
    replay: dict = {}

    def fail_over(running) -> None:
        old_url = s.redis_url
        old_port = int(old_url.rsplit(":", 1)[1].split("/")[0])
        primary = cluster_server(s, f"redis-{old_port}")
        replica = next(server for server in stack.servers(s, cluster=True)
                       if server.name.startswith("redis-") and server.port != old_port)
        # Cut the replica off: frozen, and its link closed (what the kernel buffered it still reads when it
        # thaws), so it misses what the workers commit from now on.
        os.killpg(replica.pid(), signal.SIGSTOP)
        redis.Redis.from_url(old_url).client_kill_filter(_type="replica")
        time.sleep(REPLICA_BEHIND_S)
        before = watermarks(old_url, s)
        pid = primary.pid()
        os.killpg(pid, signal.SIGKILL)
        while primary.pid() == pid:
            time.sleep(0.05)
        os.killpg(replica.pid(), signal.SIGCONT)
        new_port = stack.promote_redis(s)
        promoted = replace(s, redis_url=f"redis://127.0.0.1:{new_port}/0")
        after = watermarks(promoted.redis_url, promoted)
        replay["raw rolled back"] = {partition: (after.get((processor, partition), -1), offset)
                                     for (processor, partition), offset in before.items() if processor == "raw"}
        replay["records"] = sum(offset - after.get(key, -1) for key, offset in before.items())
        replay["by processor"] = {processor: sum(offset - after.get(key, -1) for key, offset in before.items()
                                                 if key[0] == processor) for processor in PROCESSORS}
        for name in [name for name in running if name != "sink"]:  # repointed: restarted on the new primary
            running[name].kill()
            running[name] = Role(promoted, name, "worker", "--name", name).start()
        primary.up()  # the former primary comes back as the new one's replica

    with namespace(cluster) as s:
        try:
            run = run_with_fault(s, roles, fail_over)
        finally:  # a planned switch-over back, so that the namespace is dropped where it was made
            stop_roles(roles)
            primary_now = stack.redis_primary_port(Path(s.stack_dir))
            if s.redis_url != f"redis://127.0.0.1:{primary_now}/0":
                wait_in_sync(next(port for port in stack.CLUSTER_REDIS_PORTS if port != primary_now))
                stack.promote_redis(s)
        handled = asyncio.run(_raw_records_handled(s))
    print(f"\nRedis primary SIGKILLed, replica {REPLICA_BEHIND_S} s behind promoted: {replay['records']} records "
          f"replayed from Kafka ({replay['by processor']}); stall {run.stall_s:.1f} s "
          f"(uninterrupted run {uninterrupted.stall_s:.1f} s)")
    assert replay["records"] > 0, "the promoted replica had every write: nothing was put to the test"
    # Each raw partition resumed right after the promoted replica's watermark, not at Kafka's committed offset
    # (which was ahead): every record the replica lost was handled a second time.
    not_again = {partition: [offset for offset in range(applied + 1, lost + 1) if handled[partition, offset] < 2]
                 for partition, (applied, lost) in replay["raw rolled back"].items()}
    assert not any(not_again.values()), f"raw records the state lost and never handled again: {not_again}"
    assert_same_outcome(run.outcome, uninterrupted.outcome)


def process_state(pid: int) -> str:
    """R (running), S (sleeping), ... as /proc says."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]


LATE_COMMIT_REFUSED = re.compile(r"offset commit refused|moved on under us|moved on while")


def test_c_a_worker_cut_off_past_its_session_timeout_is_fenced_and_nothing_doubles(cluster, uninterrupted, roles):
    """Two workers; one is frozen (SIGSTOP: no heartbeat, no commit) past the session timeout, so the other takes
    its partitions over, then thawed: whatever it had in flight is refused (Kafka's generation, Redis's watermark
    compare-and-set) and it rejoins."""
    frozen: dict = {}

    def partition_the_worker(running) -> None:
        worker = running["worker-a"]
        on_cpu_by = time.monotonic() + 10  # frozen while it runs, most likely amid a batch
        while time.monotonic() < on_cpu_by and process_state(worker.proc.pid) != "R":
            time.sleep(0.001)
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        frozen["at"] = time.monotonic()
        time.sleep(SESSION_TIMEOUT_S + 10)
        os.killpg(worker.proc.pid, signal.SIGCONT)
        frozen["log"] = worker.log_path

    with namespace(cluster) as s:
        run = run_with_fault(s, roles, partition_the_worker, workers=("worker-a", "worker-b"))
        stop_roles(roles)
    refusals = LATE_COMMIT_REFUSED.findall(frozen["log"].read_text(errors="replace"))
    print(f"\nworker-a frozen {SESSION_TIMEOUT_S + 10} s: stall {run.stall_s:.1f} s (uninterrupted run "
          f"{uninterrupted.stall_s:.1f} s); its late commits refused {len(refusals)} times ({Counter(refusals)})")
    assert_same_outcome(run.outcome, uninterrupted.outcome)


def rows_per_shard(settings, table: str) -> list[int]:
    return [connect(shard).execute(f"SELECT count() FROM {table}_local")[0][0]
            for shard in shard_configs(settings.clickhouse())]


def test_d_a_clickhouse_shard_down_for_30_s_costs_a_stall_and_nothing_else(cluster, uninterrupted, roles):
    """The second shard is SIGKILLed and started again 30 s later. Meanwhile every insert fails (they are
    synchronous: no shard takes part of one) and the sinks retry them, while Kafka holds the rows; the workers
    and the board never wait on ClickHouse."""
    down: dict = {}

    def stop_a_shard(running) -> None:
        shard = cluster_server(s, "clickhouse-2")
        pid = shard.pid()
        os.killpg(pid, signal.SIGKILL)
        while shard.pid() == pid:
            time.sleep(0.05)
        time.sleep(SHARD_DOWN_S)
        started = time.monotonic()
        shard.up()
        down["restart_s"] = time.monotonic() - started

    with namespace(cluster) as s:
        run = run_with_fault(s, roles, stop_a_shard)
        stop_roles(roles)
        events_per_shard = rows_per_shard(s, "events")
        retried = sum(len(re.findall(r": batch of \d+ failed", role.log_path.read_text(errors="replace")))
                      for role in roles if role.name == "sink")
    print(f"\nClickHouse shard 2 SIGKILLed, started again {SHARD_DOWN_S} s later (up in {down['restart_s']:.1f} s): "
          f"stall {run.stall_s:.1f} s (uninterrupted run {uninterrupted.stall_s:.1f} s); {retried} inserts retried; "
          f"events per shard {events_per_shard}")
    assert all(events_per_shard), "one shard holds every event: the fault did not test sharding"
    assert run.stall_s >= SHARD_DOWN_S * 0.8, "the events were readable while a shard was down"
    assert_same_outcome(run.outcome, uninterrupted.outcome)
