"""Webhook delivery on the real Redis, Kafka and ClickHouse, to receivers listening on 127.0.0.1.

Each test runs dispatchers in this event loop (or, to be killed, in a child process) with fast retry
settings and the delivery-log sink (topic webhooks.deliveries -> ClickHouse webhook_deliveries); a receiver
is a small threaded HTTP server whose answer to the n-th request is scripted, and which records every
request it gets. The receivers are on 127.0.0.1, so the dispatchers allow it explicitly (LOCAL).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import random
import re
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Awaitable, Callable

import orjson
import pytest
import redis.asyncio as aioredis

from processors import webhooks as wh
from processors.runtime.producer import BatchProducer, Outputs
from processors.runtime.writes import RedisWrites
from schemas.rules import WebhookRequest
from schemas.settings import REPO_ROOT, BatchConfig, Settings
from schemas.topics import EVENTS_DLQ, WEBHOOK_DELIVERIES
from sinks import clickhouse
from sinks.table_sink import TABLES, TableSink
from tests.integration.test_clickhouse_outage import SwitchableProxy

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"a-test-endpoint-secret-of-32-byt").decode()
SECRET_ENV = "LEADSTREAM_WEBHOOK_SECRET_S1__TEST_HOOK"  # site s1's secret
ENVIRON = {SECRET_ENV: SECRET, "LEADSTREAM_WEBHOOK_SECRET_S2__TEST_HOOK": "site-s2s-secret", "TEST_HOOK_SECRET": SECRET,
           "LEADSTREAM_REDIS_URL": "redis://:the-redis-password@127.0.0.1:6379/0"}
LOCAL = wh.WebhookTargets.parse("127.0.0.1")  # the receivers' address, allowed as an operator would
FAST_RETRIES = wh.RetryPolicy(first_delay_s=0.1, multiplier=2, max_delay_s=0.4, max_attempts=5, total_budget_s=10)
FAST = wh.DispatchOptions(max_in_flight=16, per_endpoint=4, connect_timeout_s=1, request_timeout_s=1.5, lease_s=2,
                          poll_s=0.05, log_flush_s=0.2, breaker_failures=100)


class Receiver:
    """An HTTP endpoint on 127.0.0.1. `answer(n)` gives (status, seconds to wait first) for the n-th request."""

    def __init__(self, answer: Callable[[int], tuple[int, float]] = lambda n: (200, 0.0)):
        self.answer = answer
        self.requests: list[tuple[dict[str, str], bytes, float]] = []  # headers, body, arrival (monotonic)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                    status, wait_s = receiver.answer(len(receiver.requests) - 1)
                time.sleep(wait_s)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        class QuietServer(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up on a slow answer: expected here

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    started: list[Receiver] = []

    def start(answer: Callable[[int], tuple[int, float]] = lambda n: (200, 0.0)) -> Receiver:
        started.append(Receiver(answer))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


@pytest.fixture
async def queue(settings):
    redis = aioredis.from_url(settings.redis_url)
    yield wh.WebhookQueue(redis, settings.name("ls"))
    await redis.aclose()


@pytest.fixture
async def producer(settings):
    started = BatchProducer(settings.kafka(), EVENTS_DLQ)
    await started.start()
    yield started
    await started.stop()


@contextlib.asynccontextmanager
async def deliveries_sink(settings, clickhouse_port: int | None = None):
    """The webhook_deliveries table sink running in the background (through another port if given)."""
    sink_settings = replace(settings, clickhouse_port=clickhouse_port or settings.clickhouse_port)
    sink = TableSink(TABLES["webhook_deliveries"], settings.kafka(), sink_settings.clickhouse(),
                     BatchConfig(settings.sink_batch_size, settings.sink_batch_ms))
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        yield sink
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def sink(settings):
    async with deliveries_sink(settings) as running:
        yield running


def refused_url() -> str:
    """A 127.0.0.1 port nobody listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def request(webhook_id: str, url: str, secret_env: str = SECRET_ENV) -> WebhookRequest:
    return WebhookRequest(webhook_id=webhook_id, site_id="s1", url=url, secret_env=secret_env,
                          payload={"lead_id": "lead-1", "score": 72}, rule_id="hot-lead", lead_id="lead-1",
                          ts_ms=1_700_000_000_000)


def dispatcher(queue: wh.WebhookQueue, producer, settings, options: wh.DispatchOptions = FAST,
               policy: wh.RetryPolicy = FAST_RETRIES, targets: wh.WebhookTargets = LOCAL) -> wh.WebhookDispatcher:
    return wh.WebhookDispatcher(queue, wh.DeliveryLog(queue, producer, settings.partitions), targets=targets,
                                policy=policy, options=options, environ=ENVIRON)


@contextlib.asynccontextmanager
async def dispatching(queue: wh.WebhookQueue, producer, settings, options: wh.DispatchOptions = FAST,
                      policy: wh.RetryPolicy = FAST_RETRIES, targets: wh.WebhookTargets = LOCAL):
    """A dispatcher running in the background; stopped cleanly (attempts finish, log moved on) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher(queue, producer, settings, options, policy, targets).run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def eventually(check: Callable[[], Awaitable[object]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def got_requests(receiver: Receiver, count: int) -> bool:
    return len(receiver.requests) >= count


async def status_is(queue: wh.WebhookQueue, webhook_id: str, status: str) -> bool:
    delivery = await queue.get(webhook_id)
    return delivery is not None and delivery.status == status


async def log_rows(settings, webhook_id: str, expected: int, timeout_s: float = 30.0) -> list[tuple]:
    """The webhook's delivery-log rows, once the sink has stored `expected` of them (and a moment for more)."""
    client = clickhouse.connect(settings.clickhouse())
    query = ("SELECT attempt, status_code, outcome, error FROM webhook_deliveries FINAL"
             " WHERE site_id = 's1' AND webhook_id = %(id)s ORDER BY attempt, ts_ms")
    deadline = time.monotonic() + timeout_s
    while len(rows := await asyncio.to_thread(client.execute, query, {"id": webhook_id})) < expected:
        assert time.monotonic() < deadline, f"{len(rows)} of {expected} log rows of {webhook_id} arrived"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    return await asyncio.to_thread(client.execute, query, {"id": webhook_id})


def count_rows(settings, where: str = "1", final: bool = True) -> int:
    return clickhouse.connect(settings.clickhouse()).execute(
        f"SELECT count() FROM webhook_deliveries {'FINAL' if final else ''} WHERE {where}")[0][0]


async def test_two_server_errors_then_success_is_delivered_once_with_one_id_and_valid_signatures(
        settings, queue, producer, sink, receivers):
    receiver = receivers(lambda n: (500 if n < 2 else 200, 0.0))
    assert await queue.enqueue(request("wh_retry", receiver.url))
    async with dispatching(queue, producer, settings):
        await eventually(lambda: status_is(queue, "wh_retry", "delivered"))
        await asyncio.sleep(0.5)  # nothing more arrives after the success

    assert receiver.ids() == ["wh_retry"] * 3
    bodies = {body for _, body, _ in receiver.requests}
    assert len(bodies) == 1  # every attempt sends the same bytes
    for headers, body, _ in receiver.requests:
        wh.verify(SECRET, headers, body)
        assert headers["content-type"] == "application/json"
    assert orjson.loads(bodies.pop()) == {"type": "rule.fired", "timestamp": "2023-11-14T22:13:20.000Z",
                                          "site_id": "s1", "rule_id": "hot-lead",
                                          "data": {"lead_id": "lead-1", "score": 72}}
    assert await log_rows(settings, "wh_retry", 3) == [
        (1, 500, "retrying", "HTTP 500"), (2, 500, "retrying", "HTTP 500"), (3, 200, "delivered", "")]


async def test_dead_and_hanging_endpoints_do_not_delay_a_healthy_one(settings, queue, producer, sink, receivers):
    hanging = receivers(lambda n: (200, 5.0))
    healthy = receivers()
    dead = refused_url()
    for i in range(20):
        await queue.enqueue(request(f"wh_dead_{i}", dead))
        await queue.enqueue(request(f"wh_hang_{i}", hanging.url))
    await queue.enqueue(request("wh_healthy", healthy.url))
    started = time.monotonic()
    async with dispatching(queue, producer, settings, wh.DispatchOptions(
            max_in_flight=8, per_endpoint=2, connect_timeout_s=1, request_timeout_s=1.5, lease_s=2, poll_s=0.05,
            log_flush_s=0.2, breaker_failures=100)):
        await eventually(lambda: status_is(queue, "wh_healthy", "delivered"), timeout_s=5)
        assert healthy.requests[0][2] - started < 1.0
        assert len(hanging.requests) <= 2  # the hanging endpoint never held more than its own slots
    dead_after = await queue.get("wh_dead_0")
    assert dead_after.status == "pending" and dead_after.attempts >= 1
    assert "ConnectError" in dead_after.last_error


async def test_an_open_circuit_breaker_defers_without_sending(settings, queue, producer, sink):
    dead = refused_url()
    for i in range(5):
        await queue.enqueue(request(f"wh_cb_{i}", dead))
    options = wh.DispatchOptions(max_in_flight=8, per_endpoint=1, connect_timeout_s=1, request_timeout_s=1.5,
                                 lease_s=2, poll_s=0.05, log_flush_s=0.2, breaker_failures=2, breaker_cooldown_s=30)
    budget_beyond_cooldown = wh.RetryPolicy(first_delay_s=0.1, multiplier=2, max_delay_s=0.4, total_budget_s=120)
    async with dispatching(queue, producer, settings, options, budget_beyond_cooldown):
        await asyncio.sleep(1.5)
    await eventually(lambda: asyncio.to_thread(lambda: count_rows(settings, "outcome = 'circuit_open'") >= 3))
    rows = clickhouse.connect(settings.clickhouse()).execute(
        "SELECT outcome, count(), max(next_attempt_ms) - max(ts_ms) FROM webhook_deliveries FINAL"
        " GROUP BY outcome ORDER BY outcome")
    by_outcome = {outcome: (count, gap) for outcome, count, gap in rows}
    assert by_outcome["retrying"][0] == 2  # two real attempts opened the breaker; nothing else was sent
    assert by_outcome["circuit_open"][0] >= 3
    assert 25_000 < by_outcome["circuit_open"][1] <= 30_000  # deferred until the cool-down ends
    deliveries = [await queue.get(f"wh_cb_{i}") for i in range(5)]
    assert all(d.status == "pending" for d in deliveries)
    assert sum(d.attempts for d in deliveries) == 2


async def test_a_crashed_dispatchers_claim_is_resumed_by_another_after_its_lease(
        settings, queue, producer, sink, receivers):
    receiver = receivers(lambda n: (200, 5.0 if n == 0 else 0.0))  # the first answer never comes in time
    await queue.enqueue(request("wh_crash", receiver.url))
    crashed = asyncio.create_task(dispatcher(queue, producer, settings).run(asyncio.Event()))
    await eventually(lambda: got_requests(receiver, 1))
    crashed.cancel()  # mid-request, before anything was recorded
    with contextlib.suppress(asyncio.CancelledError):
        await crashed

    async with dispatching(queue, producer, settings):
        await eventually(lambda: status_is(queue, "wh_crash", "delivered"))
    assert receiver.ids() == ["wh_crash", "wh_crash"]  # at-least-once: same webhook-id, receivers dedupe
    assert receiver.requests[1][2] - receiver.requests[0][2] >= FAST.lease_s - 0.3  # not before the lease ran out
    assert await log_rows(settings, "wh_crash", 1) == [(1, 200, "delivered", "")]


async def test_two_dispatchers_never_send_the_same_delivery_twice(settings, queue, producer, sink, receivers):
    receiver = receivers(lambda n: (200, 0.02))
    ids = [f"wh_pair_{i}" for i in range(40)]
    for webhook_id in ids:
        await queue.enqueue(request(webhook_id, receiver.url))
    async with dispatching(queue, producer, settings), dispatching(queue, producer, settings):
        for webhook_id in ids:
            await eventually(lambda: status_is(queue, webhook_id, "delivered"))
    assert sorted(receiver.ids()) == sorted(ids)


async def test_enqueue_is_atomic_with_the_firing_idempotent_and_replay_resends_the_same_id(
        settings, queue, producer, sink, receivers):
    receiver = receivers()
    firing_key = f"{settings.name('ls')}:test-firing"
    async with queue.redis.pipeline(transaction=True) as pipe:  # the processor's commit, as it would queue it
        pipe.set(firing_key, "fired")
        queue.queue_enqueue(RedisWrites(pipe), request("wh_once", receiver.url))
        assert await pipe.execute() == [True, 1]
    assert not await queue.enqueue(request("wh_once", receiver.url))  # a replayed firing: no-op

    async with dispatching(queue, producer, settings):
        await eventually(lambda: status_is(queue, "wh_once", "delivered"))
        assert not await queue.enqueue(request("wh_once", receiver.url))  # still a no-op once delivered
        await asyncio.sleep(0.5)
    assert receiver.ids() == ["wh_once"]

    assert await queue.replay("wh_once") == "requeued"
    assert await queue.replay("wh_once") == "already_pending"
    with pytest.raises(wh.UnknownWebhook):
        await queue.replay("wh_never_enqueued")
    async with dispatching(queue, producer, settings):
        await eventually(lambda: status_is(queue, "wh_once", "delivered"))
    assert receiver.ids() == ["wh_once", "wh_once"]
    assert receiver.requests[0][1] == receiver.requests[1][1]
    assert await log_rows(settings, "wh_once", 2) == [(1, 200, "delivered", ""), (2, 200, "delivered", "")]


async def test_a_missing_secret_or_a_4xx_fails_at_once_with_a_reason(settings, queue, producer, sink, receivers):
    gone = receivers(lambda n: (410, 0.0))
    await queue.enqueue(request("wh_nosecret", gone.url, secret_env="LEADSTREAM_WEBHOOK_SECRET_S1__NOT_SET"))
    await queue.enqueue(request("wh_gone", gone.url))
    async with dispatching(queue, producer, settings):
        await eventually(lambda: status_is(queue, "wh_nosecret", "failed"))
        await eventually(lambda: status_is(queue, "wh_gone", "failed"))
    assert gone.ids() == ["wh_gone"]
    assert await log_rows(settings, "wh_nosecret", 1) == [
        (1, 0, "failed", "secret env var LEADSTREAM_WEBHOOK_SECRET_S1__NOT_SET is not set")]
    assert await log_rows(settings, "wh_gone", 1) == [(1, 410, "failed", "HTTP 410")]


def test_the_documented_delivery_log_queries_run_on_this_server(settings):
    docs = (REPO_ROOT / "docs" / "webhooks.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", docs, flags=re.S)
    client = clickhouse.connect(settings.clickhouse())
    for query in queries:
        client.execute(query.replace("acme-site", "s1"))


async def test_a_receiver_on_a_private_address_gets_nothing_unless_the_operator_allows_it(
        settings, queue, producer, sink, receivers):
    receiver = receivers()
    by_name = receiver.url.replace("127.0.0.1", "localhost")
    await queue.enqueue(request("wh_loopback", receiver.url))
    await queue.enqueue(request("wh_by_name", by_name))
    await queue.enqueue(request("wh_creds", receiver.url.replace("http://", "http://crm:pw@")))
    async with dispatching(queue, producer, settings, targets=wh.WebhookTargets()):
        for webhook_id in ("wh_loopback", "wh_by_name", "wh_creds"):
            await eventually(lambda: status_is(queue, webhook_id, "failed"))
    assert receiver.requests == []  # refused before connecting, and not retried
    (loopback,) = await log_rows(settings, "wh_loopback", 1)
    assert loopback[:3] == (1, 0, "failed")
    assert loopback[3] == ("refused: 127.0.0.1 is not a public address (loopback): webhooks go only to public "
                           "addresses unless LEADSTREAM_WEBHOOK_ALLOWED_TARGETS allows it")
    (named,) = await log_rows(settings, "wh_by_name", 1)
    assert named[3].startswith("refused: localhost resolves to 127.0.0.1, which is not a public address (loopback)")
    (creds,) = await log_rows(settings, "wh_creds", 1)
    assert creds[3].startswith("refused: credentials in the URL (user:password@) are refused")

    assert await queue.replay("wh_loopback") == "requeued"  # allowed by address: the same receiver gets it
    async with dispatching(queue, producer, settings, targets=LOCAL):
        await eventually(lambda: status_is(queue, "wh_loopback", "delivered"))
    assert await queue.replay("wh_by_name") == "requeued"  # allowed by name: checked again after the lookup
    async with dispatching(queue, producer, settings, targets=wh.WebhookTargets.parse("localhost")):
        await eventually(lambda: status_is(queue, "wh_by_name", "delivered"))
    assert receiver.ids() == ["wh_loopback", "wh_by_name"]
    assert receiver.requests[1][0]["host"] == by_name.split("/")[2]  # the Host header names the URL's host


async def test_a_delivery_signs_only_with_a_secret_of_its_own_site(settings, queue, producer, sink, receivers):
    receiver = receivers()
    expected = {
        "LEADSTREAM_WEBHOOK_SECRET_S2__TEST_HOOK":
            "LEADSTREAM_WEBHOOK_SECRET_S2__TEST_HOOK is not a webhook secret of site s1: its secrets are named "
            "LEADSTREAM_WEBHOOK_SECRET_S1__<NAME>",
        "LEADSTREAM_REDIS_URL": "LEADSTREAM_REDIS_URL is one of LeadStream's own settings; site s1's webhook secrets "
                                "are named LEADSTREAM_WEBHOOK_SECRET_S1__<NAME>",
        # a bare name is read from the site's own variable, never from the variable of that name
        "TEST_HOOK_SECRET": "secret env var LEADSTREAM_WEBHOOK_SECRET_S1__TEST_HOOK_SECRET is not set",
    }
    for i, name in enumerate(expected):  # every one of them is set in the dispatcher's environment
        await queue.enqueue(request(f"wh_secret_{i}", receiver.url, secret_env=name))
    async with dispatching(queue, producer, settings):
        for i in range(len(expected)):
            await eventually(lambda: status_is(queue, f"wh_secret_{i}", "failed"))
    assert receiver.requests == []
    for i, reason in enumerate(expected.values()):
        assert await log_rows(settings, f"wh_secret_{i}", 1) == [(1, 0, "failed", reason)]


async def test_log_rows_wait_in_redis_while_kafka_refuses_and_a_row_sent_twice_is_stored_once(
        settings, queue, producer, sink, receivers):
    receiver = receivers()
    closed = BatchProducer(settings.kafka(), EVENTS_DLQ)
    await closed.start()
    await closed.stop()  # a producer that can no longer send: Kafka refuses every row
    ids = [f"wh_twice_{i}" for i in range(3)]
    for webhook_id in ids:
        await queue.enqueue(request(webhook_id, receiver.url))
    async with dispatching(queue, closed, settings):
        for webhook_id in ids:
            await eventually(lambda: status_is(queue, webhook_id, "delivered"))
    assert await queue.redis.xlen(queue.log_key) == 3  # delivered, and their rows wait in Redis

    waiting = await queue.log_rows(100)  # a dispatcher sends them, then dies before removing them ...
    outputs = Outputs(settings.partitions)
    for _, webhook_id, row in waiting:
        outputs.add(WEBHOOK_DELIVERIES, webhook_id, row)
    await producer.send(outputs)
    assert await wh.DeliveryLog(queue, producer, settings.partitions).move_to_kafka("the-next-one") == 3  # ... again
    assert await queue.redis.xlen(queue.log_key) == 0

    await eventually(lambda: asyncio.to_thread(lambda: count_rows(settings, final=False) >= 6), 30)
    assert count_rows(settings) == 3  # the twins are one row
    for webhook_id in ids:
        assert await log_rows(settings, webhook_id, 1) == [(1, 200, "delivered", "")]


CRASHY = replace(FAST, log_flush_s=0.3)


def dispatch_until_killed(settings: Settings) -> None:
    """A child process's dispatcher, for a test to SIGKILL."""
    async def run() -> None:
        redis = aioredis.from_url(settings.redis_url)
        producer = BatchProducer(settings.kafka(), EVENTS_DLQ)
        await producer.start()
        queue = wh.WebhookQueue(redis, settings.name("ls"))
        await dispatcher(queue, producer, settings, CRASHY).run(asyncio.Event())

    asyncio.run(run())


async def finished(queue: wh.WebhookQueue, ids: list[str]) -> list[wh.QueuedWebhook]:
    """The deliveries once every one is delivered or failed and every log row has left Redis, else []."""
    deliveries = [await queue.get(webhook_id) for webhook_id in ids]
    done = all(d.status != "pending" for d in deliveries) and await queue.redis.xlen(queue.log_key) == 0
    return deliveries if done else []


def attempts_logged(settings, ids: list[str]) -> dict[str, list[int]]:
    rows = clickhouse.connect(settings.clickhouse()).execute(
        "SELECT webhook_id, attempt FROM webhook_deliveries FINAL WHERE webhook_id IN %(ids)s ORDER BY attempt",
        {"ids": tuple(ids)})
    logged: dict[str, list[int]] = {webhook_id: [] for webhook_id in ids}
    for webhook_id, attempt in rows:
        logged[webhook_id].append(attempt)
    return logged


@pytest.mark.slow
async def test_every_attempt_is_logged_exactly_once_although_the_dispatcher_is_killed_mid_delivery(
        settings, queue, receivers):
    receiver = receivers(lambda n: (500 if n % 3 == 0 else 200, 0.15))
    ids = [f"wh_kill_{i}" for i in range(30)]
    for webhook_id in ids:
        await queue.enqueue(request(webhook_id, receiver.url))
    spawn = multiprocessing.get_context("spawn")
    rng = random.Random(11)
    rows_waiting_at_kills = []
    for _ in range(6):
        child = spawn.Process(target=dispatch_until_killed, args=(settings,), daemon=True)
        before = len(receiver.requests)
        child.start()
        await eventually(lambda: got_requests(receiver, before + 2), 30)  # at work ...
        await asyncio.sleep(rng.uniform(0, 0.6))
        child.kill()  # ... SIGKILL: requests in flight, outcomes being stored, rows on their way to Kafka
        await asyncio.to_thread(child.join)
        rows_waiting_at_kills.append(await queue.redis.xlen(queue.log_key))
    last = spawn.Process(target=dispatch_until_killed, args=(settings,), daemon=True)
    last.start()
    try:
        deadline = time.monotonic() + 120
        while not (deliveries := await finished(queue, ids)):
            assert time.monotonic() < deadline, "deliveries did not finish"
            await asyncio.sleep(0.2)
    finally:
        last.kill()
        await asyncio.to_thread(last.join)

    assert max(rows_waiting_at_kills) > 0  # some kills left rows in Redis that only a later dispatcher sent
    expected = {d.webhook_id: list(range(1, d.attempts + 1)) for d in deliveries}
    async with deliveries_sink(settings):
        deadline = time.monotonic() + 60
        while (logged := await asyncio.to_thread(attempts_logged, settings, ids)) != expected:
            assert time.monotonic() < deadline, {k: v for k, v in logged.items() if v != expected[k]}
            await asyncio.sleep(0.3)
    assert len(receiver.requests) >= sum(d.attempts for d in deliveries)  # attempts cut short were made again


@pytest.mark.slow
async def test_no_log_row_is_lost_while_clickhouse_is_down_the_topic_holds_them(settings, queue, producer, receivers):
    proxy = SwitchableProxy(settings.clickhouse_port)  # closed: the sink cannot reach ClickHouse
    proxy.start()
    receiver = receivers(lambda n: (503 if n % 2 == 0 else 200, 0.0))
    ids = [f"wh_outage_{i}" for i in range(24)]
    try:
        async with deliveries_sink(settings, proxy.port):
            for part in (ids[:12], ids[12:]):  # two dispatcher lifetimes: none keeps rows for later
                for webhook_id in part:
                    await queue.enqueue(request(webhook_id, receiver.url))
                async with dispatching(queue, producer, settings):
                    await eventually(lambda: finished(queue, part), 30)
            deliveries = await finished(queue, ids)
            assert await asyncio.to_thread(count_rows, settings, final=False) == 0  # nothing reached ClickHouse
            expected = {d.webhook_id: list(range(1, d.attempts + 1)) for d in deliveries}
            assert sum(map(len, expected.values())) > len(ids)  # retries were logged too

            proxy.open = True  # ClickHouse is back: the sink writes what the topic held
            deadline = time.monotonic() + 90
            while (logged := await asyncio.to_thread(attempts_logged, settings, ids)) != expected:
                assert time.monotonic() < deadline, {k: v for k, v in logged.items() if v != expected[k]}
                await asyncio.sleep(0.3)
    finally:
        proxy.close_all()
