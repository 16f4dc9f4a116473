"""Webhook delivery on the real Redis and ClickHouse, to receivers listening on 127.0.0.1.

Each test runs dispatchers in this event loop with fast retry settings; a receiver is a small threaded
HTTP server whose answer to the n-th request is scripted, and which records every request it gets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Awaitable, Callable

import orjson
import pytest
import redis.asyncio as aioredis

from processors import webhooks as wh
from schemas.rules import WebhookRequest
from schemas.settings import REPO_ROOT
from sinks import clickhouse

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"a-test-endpoint-secret-of-32-byt").decode()
ENVIRON = {"TEST_HOOK_SECRET": SECRET}
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


def refused_url() -> str:
    """A 127.0.0.1 port nobody listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def request(webhook_id: str, url: str, secret_env: str = "TEST_HOOK_SECRET") -> WebhookRequest:
    return WebhookRequest(webhook_id=webhook_id, site_id="s1", url=url, secret_env=secret_env,
                          payload={"lead_id": "lead-1", "score": 72}, rule_id="hot-lead", lead_id="lead-1",
                          ts_ms=1_700_000_000_000)


@contextlib.asynccontextmanager
async def dispatching(queue: wh.WebhookQueue, settings, options: wh.DispatchOptions = FAST,
                      policy: wh.RetryPolicy = FAST_RETRIES):
    """A dispatcher running in the background; stopped cleanly (attempts finish, log flushed) on exit."""
    dispatcher = wh.WebhookDispatcher(queue, wh.DeliveryLog(clickhouse.connect(settings.clickhouse())),
                                      policy=policy, options=options, environ=ENVIRON)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
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


def log_rows(settings, webhook_id: str) -> list[tuple]:
    return clickhouse.connect(settings.clickhouse()).execute(
        "SELECT attempt, status_code, outcome, error FROM webhook_deliveries FINAL"
        " WHERE site_id = 's1' AND webhook_id = %(id)s ORDER BY attempt, ts_ms", {"id": webhook_id})


async def test_two_server_errors_then_success_is_delivered_once_with_one_id_and_valid_signatures(
        settings, queue, receivers):
    receiver = receivers(lambda n: (500 if n < 2 else 200, 0.0))
    assert await queue.enqueue(request("wh_retry", receiver.url))
    async with dispatching(queue, settings):
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
    assert log_rows(settings, "wh_retry") == [(1, 500, "retrying", "HTTP 500"), (2, 500, "retrying", "HTTP 500"),
                                              (3, 200, "delivered", "")]


async def test_dead_and_hanging_endpoints_do_not_delay_a_healthy_one(settings, queue, receivers):
    hanging = receivers(lambda n: (200, 5.0))
    healthy = receivers()
    dead = refused_url()
    for i in range(20):
        await queue.enqueue(request(f"wh_dead_{i}", dead))
        await queue.enqueue(request(f"wh_hang_{i}", hanging.url))
    await queue.enqueue(request("wh_healthy", healthy.url))
    started = time.monotonic()
    async with dispatching(queue, settings, wh.DispatchOptions(
            max_in_flight=8, per_endpoint=2, connect_timeout_s=1, request_timeout_s=1.5, lease_s=2, poll_s=0.05,
            log_flush_s=0.2, breaker_failures=100)):
        await eventually(lambda: status_is(queue, "wh_healthy", "delivered"), timeout_s=5)
        assert healthy.requests[0][2] - started < 1.0
        assert len(hanging.requests) <= 2  # the hanging endpoint never held more than its own slots
    dead_after = await queue.get("wh_dead_0")
    assert dead_after.status == "pending" and dead_after.attempts >= 1
    assert "ConnectError" in dead_after.last_error


async def test_an_open_circuit_breaker_defers_without_sending(settings, queue):
    dead = refused_url()
    for i in range(5):
        await queue.enqueue(request(f"wh_cb_{i}", dead))
    options = wh.DispatchOptions(max_in_flight=8, per_endpoint=1, connect_timeout_s=1, request_timeout_s=1.5,
                                 lease_s=2, poll_s=0.05, log_flush_s=0.2, breaker_failures=2, breaker_cooldown_s=30)
    budget_beyond_cooldown = wh.RetryPolicy(first_delay_s=0.1, multiplier=2, max_delay_s=0.4, total_budget_s=120)
    async with dispatching(queue, settings, options, budget_beyond_cooldown):
        await asyncio.sleep(1.5)
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


async def test_a_crashed_dispatchers_claim_is_resumed_by_another_after_its_lease(settings, queue, receivers):
    receiver = receivers(lambda n: (200, 5.0 if n == 0 else 0.0))  # the first answer never comes in time
    await queue.enqueue(request("wh_crash", receiver.url))
    crashed = asyncio.create_task(wh.WebhookDispatcher(
        queue, wh.DeliveryLog(clickhouse.connect(settings.clickhouse())), policy=FAST_RETRIES, options=FAST,
        environ=ENVIRON).run(asyncio.Event()))
    await eventually(lambda: got_requests(receiver, 1))
    crashed.cancel()  # mid-request, before anything was recorded
    with contextlib.suppress(asyncio.CancelledError):
        await crashed

    async with dispatching(queue, settings):
        await eventually(lambda: status_is(queue, "wh_crash", "delivered"))
    assert receiver.ids() == ["wh_crash", "wh_crash"]  # at-least-once: same webhook-id, receivers dedupe
    assert receiver.requests[1][2] - receiver.requests[0][2] >= FAST.lease_s - 0.3  # not before the lease ran out
    assert log_rows(settings, "wh_crash") == [(1, 200, "delivered", "")]


async def test_two_dispatchers_never_send_the_same_delivery_twice(settings, queue, receivers):
    receiver = receivers(lambda n: (200, 0.02))
    ids = [f"wh_pair_{i}" for i in range(40)]
    for webhook_id in ids:
        await queue.enqueue(request(webhook_id, receiver.url))
    async with dispatching(queue, settings), dispatching(queue, settings):
        for webhook_id in ids:
            await eventually(lambda: status_is(queue, webhook_id, "delivered"))
    assert sorted(receiver.ids()) == sorted(ids)


async def test_enqueue_is_atomic_with_the_firing_idempotent_and_replay_resends_the_same_id(
        settings, queue, receivers):
    receiver = receivers()
    firing_key = f"{settings.name('ls')}:test-firing"
    async with queue.redis.pipeline(transaction=True) as pipe:  # the processor's commit, as it would queue it
        pipe.set(firing_key, "fired")
        queue.queue_enqueue(pipe, request("wh_once", receiver.url))
        assert await pipe.execute() == [True, 1]
    assert not await queue.enqueue(request("wh_once", receiver.url))  # a replayed firing: no-op

    async with dispatching(queue, settings):
        await eventually(lambda: status_is(queue, "wh_once", "delivered"))
        assert not await queue.enqueue(request("wh_once", receiver.url))  # still a no-op once delivered
        await asyncio.sleep(0.5)
    assert receiver.ids() == ["wh_once"]

    assert await queue.replay("wh_once") == "requeued"
    assert await queue.replay("wh_once") == "already_pending"
    with pytest.raises(wh.UnknownWebhook):
        await queue.replay("wh_never_enqueued")
    async with dispatching(queue, settings):
        await eventually(lambda: status_is(queue, "wh_once", "delivered"))
    assert receiver.ids() == ["wh_once", "wh_once"]
    assert receiver.requests[0][1] == receiver.requests[1][1]
    assert log_rows(settings, "wh_once") == [(1, 200, "delivered", ""), (2, 200, "delivered", "")]


async def test_a_missing_secret_or_a_4xx_fails_at_once_with_a_reason(settings, queue, receivers):
    gone = receivers(lambda n: (410, 0.0))
    await queue.enqueue(request("wh_nosecret", gone.url, secret_env="NOT_SET_ANYWHERE"))
    await queue.enqueue(request("wh_gone", gone.url))
    async with dispatching(queue, settings):
        await eventually(lambda: status_is(queue, "wh_nosecret", "failed"))
        await eventually(lambda: status_is(queue, "wh_gone", "failed"))
    assert gone.ids() == ["wh_gone"]
    assert log_rows(settings, "wh_nosecret") == [(1, 0, "failed", "secret env var NOT_SET_ANYWHERE is not set")]
    assert log_rows(settings, "wh_gone") == [(1, 410, "failed", "HTTP 410")]


def test_the_documented_delivery_log_queries_run_on_this_server(settings):
    docs = (REPO_ROOT / "docs" / "webhooks.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", docs, flags=re.S)
    client = clickhouse.connect(settings.clickhouse())
    for query in queries:
        client.execute(query.replace("acme-site", "s1"))
