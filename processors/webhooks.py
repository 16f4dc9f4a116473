"""Webhook delivery by the Standard Webhooks spec: signed, retried with backoff, durable, replayable, and
only ever to addresses the operator allows.

Why the lead processor never waits for a delivery: it only queues one, with `WebhookQueue.queue_enqueue`, in
the same Redis transaction that records the rule firing. The firing and its webhook are then committed
together or not at all, and a replayed firing finds its `webhook_id` already queued and adds nothing.
A separate loop (`WebhookDispatcher.run`, one or more per deployment) claims due deliveries with a lease and
posts them. Each attempt's outcome and its delivery-log row are stored in one Redis step (`settle`), so
neither exists without the other; `DeliveryLog` then moves the rows to the Kafka topic `webhooks.deliveries`,
which the table sink writes to ClickHouse `webhook_deliveries` like every other table.

Where a webhook may go: public addresses only, unless the operator's allowlist (setting
`webhook_allowed_targets`) names the host or network. A rule's URL is checked when the rule is stored
(`definition_problems`: credentials in the URL, a literal address) and again before every connection, after
DNS: every address the host resolves to must pass, and the connection goes to an address that was checked
(`GuardedNetworkBackend`), so a DNS answer that changes in between (rebinding) cannot redirect it.

Redis keys, under the pipeline's prefix (`settings.name("ls")`):
  {prefix}:wh:req       hash    webhook_id -> QueuedWebhook JSON (pending and finished ones)
  {prefix}:wh:due       zset    webhook_id -> next attempt (epoch ms); while claimed: the lease expiry
  {prefix}:wh:lease     hash    webhook_id -> token of the dispatcher that claimed it
  {prefix}:wh:finished  zset    webhook_id -> when it was delivered or failed (for replay, then pruned)
  {prefix}:wh:log       stream  delivery-log rows Kafka has not acknowledged yet (fields: key, row)
  {prefix}:wh:log-turn  string  token of the dispatcher moving the log to Kafka now (expires)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import re
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Iterable, Literal, Mapping

import httpcore
import httpx
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from processors.runtime.producer import BatchProducer, Outputs
from processors.runtime.redis_client import redis_from_url
from processors.runtime.writes import RedisWrites, Writes
from schemas.boards import BoardDefinition
from schemas.records import JsonRecord
from schemas.redis_keys import RedisKeys
from schemas.rules import (Rule, WebhookDelivery, WebhookOutcome, WebhookRequest, webhook_secret_problem,
                           webhook_secret_variable)
from schemas.settings import Settings
from schemas.topics import EVENTS_DLQ, WEBHOOK_DELIVERIES

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SIGNATURE_TOLERANCE_S = 300
USER_AGENT = "LeadStream-Webhooks/1"
EVENT_TYPE = "rule.fired"


# --- signing (pure) -------------------------------------------------------------------------------


class InvalidSecret(ValueError):
    """The configured secret cannot be used as a key."""


class WebhookVerificationError(ValueError):
    """A received webhook does not carry a valid, fresh signature."""


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key of a secret: `whsec_<base64>` (the spec's form) is base64-decoded; any other string is
    used as its raw UTF-8 bytes, so a secret pasted from a system without the prefix still works."""
    if isinstance(secret, bytes):
        key = secret
    elif secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except binascii.Error as exc:
            raise InvalidSecret("a whsec_ secret must be followed by valid base64") from exc
    else:
        key = secret.encode()
    if not key:
        raise InvalidSecret("the secret is empty")
    return key


def sign(secret: str | bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, the value of `webhook-signature`."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret_key(secret), signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str | bytes, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def verify(secret: str | bytes, headers: Mapping[str, str], body: bytes, *,
           tolerance_s: int = SIGNATURE_TOLERANCE_S, now_s: float | None = None) -> None:
    """Raise WebhookVerificationError unless one `v1` signature matches and the timestamp is within
    `tolerance_s` of now (a stale timestamp means a replayed capture). Use it in receivers."""
    lowered = {name.lower(): value for name, value in headers.items()}
    webhook_id = lowered.get("webhook-id")
    timestamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not webhook_id or not timestamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    now = time.time() if now_s is None else now_s
    if abs(now - sent_at) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance window")
    expected = sign(secret, webhook_id, sent_at, body).split(",", 1)[1]
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return
    raise WebhookVerificationError("no matching signature")


def request_body(request: WebhookRequest, fired_ms: int) -> bytes:
    """The spec's recommended envelope (type, timestamp, data) around the payload, plus the site and the rule
    (`rule.fired`) or the board (`stage.changed`) so a receiver can route it. Built once, at enqueue: every
    attempt and replay sends these bytes."""
    fired_at = datetime.fromtimestamp(fired_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
    envelope = {"type": request.event_type or EVENT_TYPE, "timestamp": fired_at.replace("+00:00", "Z"),
                "site_id": request.site_id}
    if request.board_id:
        envelope["board_id"] = request.board_id
    else:
        envelope["rule_id"] = request.rule_id
    envelope["data"] = request.payload
    return orjson.dumps(envelope, default=str, option=orjson.OPT_NON_STR_KEYS)


# --- where a webhook may go (pure) ---------------------------------------------------------------

ALLOWED_TARGETS_SETTING = "LEADSTREAM_WEBHOOK_ALLOWED_TARGETS"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


CLOUD_METADATA: frozenset[IPAddress] = frozenset(ipaddress.ip_address(address) for address in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    "169.254.170.2",  # AWS ECS task metadata
    "169.254.169.123",  # AWS time sync
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
    "fd00:ec2::254",  # AWS, over IPv6
    "fd00:ec2::123",
))
"""Refused even inside an allowed network: only the exact address (a /32 or /128 entry) re-allows one."""

_NOT_PUBLIC: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("unspecified", _networks("0.0.0.0/8", "::/128")),
    ("loopback", _networks("127.0.0.0/8", "::1/128")),
    ("link-local", _networks("169.254.0.0/16", "fe80::/10")),
    ("private, RFC 1918", _networks("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    ("shared address space, CGNAT", _networks("100.64.0.0/10")),
    ("unique local, ULA", _networks("fc00::/7")),
    ("multicast", _networks("224.0.0.0/4", "ff00::/8")),
)
_CARRY_IPV4 = _networks("::ffff:0:0/96", "::/96", "64:ff9b::/96", "64:ff9b:1::/48")  # mapped, compatible, NAT64
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped or -compatible, NAT64, 6to4): a connection to it may
    end at that IPv4 address, so it is judged by it."""
    if ip.version != 6:
        return None
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in network for network in _CARRY_IPV4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_kind(ip: IPAddress) -> str | None:
    """What makes `ip` no place for a webhook, or None for a public address."""
    if ip in CLOUD_METADATA:
        return "cloud metadata"
    for kind, networks in _NOT_PUBLIC:
        if any(ip in network for network in networks):
            return kind
    inner = embedded_ipv4(ip)
    if inner is not None:
        kind = address_kind(inner)
        return f"{kind}, as {inner}" if kind else None
    return None if ip.is_global else "reserved"


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host spells out, in any form a resolver also reads as one (`127.1`,
    `0x7f.0.0.1`, `2130706433`), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


@dataclass(frozen=True)
class WebhookTargets:
    """The operator's allowlist (setting `webhook_allowed_targets`): host names whose every address is allowed,
    and networks whose addresses are. Without it only public addresses are webhook targets. A cloud
    metadata address is allowed only by a network entry of exactly that address."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> WebhookTargets:
        """`crm.internal, 10.1.0.0/16, 127.0.0.1` (comma-separated; no ports, no wildcards)."""
        hosts, networks = set(), []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            host = entry.lower().rstrip(".")
            if not _HOST_NAME.fullmatch(host):
                raise ValueError(f"{ALLOWED_TARGETS_SETTING}: {entry!r} is neither a host name nor an address or "
                                 "network (CIDR)")
            hosts.add(host)
        return cls(frozenset(hosts), tuple(networks))

    def _allows(self, host: str, ip: IPAddress, kind: str) -> bool:
        if kind == "cloud metadata":
            return any(network.num_addresses == 1 and ip in network for network in self.networks)
        inner = embedded_ipv4(ip)
        return (host in self.hosts or any(ip in network for network in self.networks)
                or (inner is not None and any(inner in network for network in self.networks)))

    def refusal(self, host: str, addresses: Iterable[IPAddress]) -> str | None:
        """Why `host`, which resolved to `addresses`, is no webhook target; None when every address passes."""
        host = host.lower().rstrip(".")
        for ip in addresses:
            kind = address_kind(ip)
            if kind is None or self._allows(host, ip, kind):
                continue
            what = str(ip) if literal_address(host) == ip else f"{host} resolves to {ip}, which"
            return (f"{what} is not a public address ({kind}): webhooks go only to public addresses unless "
                    f"{ALLOWED_TARGETS_SETTING} allows it")
        return None


def url_problem(url: str, targets: WebhookTargets) -> str | None:
    """What is wrong with a webhook URL before any DNS lookup, or None: not http(s), credentials in it, or a
    literal address (or `localhost`) the allowlist does not allow. A name's addresses are checked when
    connecting (GuardedNetworkBackend)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"not a valid URL: {exc}"
    if parsed.scheme not in ("http", "https"):
        return "only http:// and https:// URLs are webhook targets"
    if parsed.userinfo:
        return ("credentials in the URL (user:password@) are refused: a URL is shown and logged, and the "
                "webhook's signature is what authenticates LeadStream to the endpoint")
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        return "the URL has no host"
    ip = literal_address(host)
    if ip is None and (host == "localhost" or host.endswith(".localhost")):
        ip = ipaddress.ip_address("127.0.0.1")  # RFC 6761: always the loopback interface
    return None if ip is None else targets.refusal(host, [ip])


def definition_problems(site_id: str, rules: Iterable[tuple[str, Rule]], targets: WebhookTargets) -> list[str]:
    """Each labelled rule's webhooks, as the site may use them: a secret variable of the site's own
    (schemas.rules.webhook_secret_problem) and an allowed URL. The definitions store refuses a write with any."""
    problems = []
    for label, rule in rules:
        for index, action in enumerate(rule.then):
            hook = action.webhook
            if hook is None:
                continue
            problems += _hook_problems(site_id, f"{label}: then[{index}].webhook", hook.secret_env,
                                       "url", hook.url, targets)
    return problems


def _hook_problems(site_id: str, where: str, secret_env: str, url_field: str, url: str,
                   targets: WebhookTargets) -> list[str]:
    """One webhook's problems, each named by its field under `where`: a secret variable that is not the
    site's own, a URL not allowed."""
    problems = []
    secret = webhook_secret_problem(site_id, secret_env)
    if secret:
        problems.append(f"{where}.secret_env: {secret}")
    target = url_problem(url, targets)
    if target:
        problems.append(f"{where}.{url_field}: {target}")
    return problems


def board_webhook_problems(site_id: str, boards: Iterable[tuple[str, BoardDefinition]],
                           targets: WebhookTargets) -> list[str]:
    """Each labelled board's on_stage_change webhook, checked exactly as a rule's webhook is: a secret variable
    of the site's own and an allowed URL."""
    problems = []
    for label, board in boards:
        hook = board.on_stage_change
        if hook is None:
            continue
        problems += _hook_problems(site_id, f"{label}: on_stage_change", hook.secret_env, "webhook", hook.webhook,
                                   targets)
    return problems


# --- what an attempt means (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    """One attempt, classified. `retryable` failures also count against the endpoint's circuit breaker."""

    kind: Literal["success", "retryable", "permanent"]
    status_code: int = 0  # 0: no HTTP response
    error: str = ""
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Retry-After as delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now_s)
    except (TypeError, ValueError):
        return None


def classify_response(status_code: int, headers: Mapping[str, str], body_start: str, now_s: float) -> AttemptResult:
    """2xx delivered; 408, 429 and 5xx retried (honouring Retry-After); anything else (other 4xx, and 3xx:
    redirects are not followed) fails for good, since sending the same request again cannot help."""
    if 200 <= status_code < 300:
        return AttemptResult("success", status_code)
    error = f"HTTP {status_code}" + (f": {body_start}" if body_start else "")
    if status_code in (408, 429) or status_code >= 500:
        return AttemptResult("retryable", status_code, error, parse_retry_after(headers.get("retry-after"), now_s))
    return AttemptResult("permanent", status_code, error)


class TargetRefused(Exception):
    """The webhook's URL, or an address its host resolves to, is not an allowed target (WebhookTargets)."""


def classify_exception(exc: BaseException) -> AttemptResult:
    """Timeouts and network errors are retried; a refused target, or a URL that cannot be sent to at all,
    fails for good: the same request would be refused again."""
    if isinstance(exc, TargetRefused):
        return AttemptResult("permanent", error=f"refused: {exc}")
    if isinstance(exc, (httpcore.UnsupportedProtocol, httpx.InvalidURL)):
        return AttemptResult("permanent", error=f"invalid url: {exc}")
    if isinstance(exc, (TimeoutError, httpcore.TimeoutException)):
        return AttemptResult("retryable", error="timeout")
    return AttemptResult("retryable", error=f"{type(exc).__name__}: {exc}"[:500])


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: retry n waits uniform(0, min(max_delay_s, first_delay_s *
    multiplier**(n-1))), and at least what Retry-After asked for. A delivery fails after `max_attempts`,
    or when its next attempt would start more than `total_budget_s` after the first attempt."""

    first_delay_s: float = 5.0
    multiplier: float = 6.0  # ceilings 5 s, 30 s, 3 min, 18 min, 1 h 48 min, then 2 h
    max_delay_s: float = 7200.0
    max_attempts: int = 10
    total_budget_s: float = 86400.0

    def ceiling_s(self, retry_number: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * self.multiplier ** (retry_number - 1))

    def next_delay_s(self, attempts_made: int, elapsed_s: float, rng: random.Random,
                     retry_after_s: float | None = None) -> float | None:
        """Seconds until the next attempt, or None: give up."""
        if attempts_made >= self.max_attempts:
            return None
        delay = max(rng.uniform(0, self.ceiling_s(attempts_made)), retry_after_s or 0.0)
        return None if elapsed_s + delay > self.total_budget_s else delay


class CircuitBreaker:
    """One endpoint's breaker, so a dead endpoint costs one probe per cool-down instead of a request per
    pending delivery. Closed: requests go. After `failure_threshold` consecutive retryable failures it opens:
    nothing goes for `cooldown_s`. Then half-open: exactly one probe goes; success closes it, failure
    re-opens it for another cool-down."""

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 60.0):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.consecutive_failures = 0
        self.opened_at_s: float | None = None
        self.probe_in_flight = False

    def state(self, now_s: float) -> Literal["closed", "open", "half_open"]:
        if self.opened_at_s is None:
            return "closed"
        return "half_open" if now_s >= self.opened_at_s + self.cooldown_s else "open"

    def allow(self, now_s: float) -> bool:
        """May a request go now? In half-open state this hands out the single probe."""
        state = self.state(now_s)
        if state == "closed":
            return True
        if state == "half_open" and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def retry_at_s(self, now_s: float) -> float:
        """When a request refused now should ask again."""
        if self.state(now_s) == "open":
            return self.opened_at_s + self.cooldown_s  # type: ignore[operator]
        return now_s + self.cooldown_s  # half-open with its probe out: wait for the probe's verdict

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.opened_at_s = None
        self.probe_in_flight = False

    def record_failure(self, now_s: float) -> None:
        self.consecutive_failures += 1
        if self.probe_in_flight or self.consecutive_failures >= self.failure_threshold:
            self.opened_at_s = now_s
        self.probe_in_flight = False


# --- records --------------------------------------------------------------------------------------


@dataclass(slots=True)
class QueuedWebhook(JsonRecord):
    """A delivery as Redis keeps it, from enqueue until it is pruned after finishing."""

    webhook_id: str
    site_id: str
    rule_id: str
    url: str
    secret_env: str
    body: str  # the exact JSON body, frozen at enqueue
    enqueued_ms: int
    status: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0  # over all rounds: numbers the delivery-log rows
    round_attempts: int = 0  # in the current round (a replay starts a new one, with a fresh retry budget)
    round_started_ms: int = 0  # first attempt of the current round; 0 before it
    last_error: str = ""
    board_id: str = ""  # a board's stage.changed webhook


def next_step(delivery: QueuedWebhook, result: AttemptResult, policy: RetryPolicy, now_ms: int,
              rng: random.Random) -> tuple[QueuedWebhook, WebhookOutcome, int | None]:
    """After an attempt made at now_ms: the updated delivery, the outcome, and when to try next (None: done)."""
    round_started_ms = delivery.round_started_ms or now_ms
    attempted = replace(delivery, attempts=delivery.attempts + 1, round_attempts=delivery.round_attempts + 1,
                        round_started_ms=round_started_ms, last_error=result.error)
    if result.kind == "success":
        return replace(attempted, status="delivered"), "delivered", None
    if result.kind == "retryable":
        delay = policy.next_delay_s(attempted.round_attempts, (now_ms - round_started_ms) / 1000, rng,
                                    result.retry_after_s)
        if delay is not None:
            return attempted, "retrying", now_ms + int(delay * 1000)
        gave_up = f"gave up after {attempted.round_attempts} attempts: {result.error}"
        return replace(attempted, status="failed", last_error=gave_up), "failed", None
    return replace(attempted, status="failed"), "failed", None


# --- Redis queue ----------------------------------------------------------------------------------

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local claimed = {}
for _, id in ipairs(ids) do
  local record = redis.call('HGET', KEYS[2], id)
  if record then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    redis.call('HSET', KEYS[3], id, ARGV[3])
    table.insert(claimed, record)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return claimed
"""
_SETTLE = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
end
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[5], '*', 'key', ARGV[1], 'row', ARGV[6])
end
return 1
"""
_TAKE_TURN = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_END_TURN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
_REQUEUE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""
_PRUNE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
for _, id in ipairs(ids) do
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""


class UnknownWebhook(KeyError):
    """No delivery with this webhook_id is queued or kept (never enqueued, or pruned after retention)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class WebhookQueue:
    """The durable queue in Redis. Each step is one Lua call, so a crash between steps loses nothing: an
    unsettled claim simply becomes due again when its lease expires."""

    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis = redis
        keys = RedisKeys(prefix)
        self.requests_key = keys.webhook_requests
        self.due_key = keys.webhook_due
        self.leases_key = keys.webhook_leases
        self.finished_key = keys.webhook_finished
        self.log_key = keys.webhook_log
        self.log_turn_key = keys.webhook_log_turn
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._requeue = redis.register_script(_REQUEUE)
        self._prune = redis.register_script(_PRUNE)
        self._take_turn = redis.register_script(_TAKE_TURN)
        self._end_turn = redis.register_script(_END_TURN)

    def queue_enqueue(self, writes: Writes, request: WebhookRequest, now_ms: int | None = None) -> None:
        """Queue the delivery in a commit's writes (the lead processor's batch; a Redis pipeline through
        `RedisWrites`); sends nothing itself. A webhook_id already known (pending, or finished within
        retention) makes it a no-op: on Redis the queued call returns 1 when it queued a new delivery, 0
        otherwise. `now_ms` is the time of enqueue (the caller's clock; the wall clock when not given); the
        body's timestamp is the firing's `ts_ms` (the time of enqueue when that is 0)."""
        now_ms = _now_ms() if now_ms is None else now_ms
        delivery = QueuedWebhook(
            webhook_id=request.webhook_id, site_id=request.site_id, rule_id=request.rule_id, url=request.url,
            secret_env=request.secret_env, body=request_body(request, request.ts_ms or now_ms).decode(),
            enqueued_ms=now_ms, board_id=request.board_id)
        writes.enqueue_once(self.requests_key, request.webhook_id, delivery.to_json(), self.due_key, now_ms)

    async def enqueue(self, request: WebhookRequest) -> bool:
        """Enqueue outside any other transaction; False when the webhook_id was already known."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_enqueue(RedisWrites(pipe), request)
            (queued,) = await pipe.execute()
        return bool(queued)

    async def get(self, webhook_id: str) -> QueuedWebhook | None:
        raw = await self.redis.hget(self.requests_key, webhook_id)
        return QueuedWebhook.from_json(raw) if raw else None

    async def claim(self, token: str, now_ms: int, lease_ms: int, limit: int) -> list[QueuedWebhook]:
        """Take up to `limit` due deliveries for `lease_ms`: until then no other dispatcher sees them."""
        raw = await self._claim(keys=[self.due_key, self.requests_key, self.leases_key],
                                args=[now_ms, now_ms + lease_ms, token, limit])
        return [QueuedWebhook.from_json(record) for record in raw]

    async def settle(self, token: str, delivery: QueuedWebhook, next_attempt_ms: int | None, now_ms: int,
                     log_row: WebhookDelivery | None = None) -> bool:
        """Store the delivery after an attempt, schedule it (None: finished) and add the attempt's log row to
        the log stream, all in one step: an outcome is never stored without its row, nor a row without its
        outcome. False when the lease was lost to another dispatcher, which then owns the delivery (and
        makes the attempt again); nothing is written."""
        done = await self._settle(
            keys=[self.due_key, self.requests_key, self.leases_key, self.finished_key, self.log_key],
            args=[delivery.webhook_id, token, delivery.to_json(),
                  "" if next_attempt_ms is None else next_attempt_ms, now_ms,
                  b"" if log_row is None else log_row.to_json()])
        return bool(done)

    async def replay(self, webhook_id: str) -> Literal["requeued", "already_pending"]:
        """Send a delivered or failed webhook again, with the same webhook-id and body (receivers dedupe on
        the id) and a fresh retry budget; attempt numbers continue, so the log keeps every attempt."""
        while True:
            raw = await self.redis.hget(self.requests_key, webhook_id)
            if raw is None:
                raise UnknownWebhook(webhook_id)
            delivery = QueuedWebhook.from_json(raw)
            if delivery.status == "pending":
                return "already_pending"
            again = replace(delivery, status="pending", round_attempts=0, round_started_ms=0, last_error="")
            if await self._requeue(keys=[self.requests_key, self.due_key, self.finished_key],
                                   args=[webhook_id, raw, again.to_json(), _now_ms()]):
                return "requeued"

    async def prune_finished(self, before_ms: int) -> int:
        """Forget up to 1,000 deliveries finished before `before_ms` (they can no longer be replayed)."""
        return int(await self._prune(keys=[self.finished_key, self.requests_key], args=[before_ms]))

    async def log_rows(self, limit: int) -> list[tuple[bytes, bytes, bytes]]:
        """The oldest log rows not yet acknowledged by Kafka: (stream entry id, webhook_id, row JSON)."""
        entries = await self.redis.xrange(self.log_key, count=limit)
        return [(entry_id, fields[b"key"], fields[b"row"]) for entry_id, fields in entries]

    async def forget_log_rows(self, entry_ids: list[bytes]) -> None:
        await self.redis.xdel(self.log_key, *entry_ids)

    async def take_log_turn(self, token: str, ttl_ms: int) -> bool:
        """Become (or stay, for `ttl_ms` more) the one dispatcher moving the log to Kafka."""
        return bool(await self._take_turn(keys=[self.log_turn_key], args=[token, ttl_ms]))

    async def end_log_turn(self, token: str) -> None:
        await self._end_turn(keys=[self.log_turn_key], args=[token])


# --- delivery log ---------------------------------------------------------------------------------


class DeliveryLog:
    """Moves delivery-log rows from Redis to Kafka topic `webhooks.deliveries` (keyed by webhook_id), whose
    sink writes ClickHouse `webhook_deliveries`.

    A row reaches Redis in the same step that stores its attempt's outcome (WebhookQueue.settle) and leaves
    it only after Kafka acknowledged it, so neither a crash nor a Kafka or ClickHouse outage loses one: rows
    wait in Redis while Kafka is down, and in the topic while ClickHouse is. One dispatcher at a time moves
    them (a turn that expires if its holder dies), so two never send the same rows; a dispatcher that dies
    between Kafka's ack and removing the rows leaves them to be sent again — the same rows, byte for byte,
    which the table collapses (ReplacingMergeTree keyed by site, webhook, attempt and start time)."""

    TURN_MS = 30_000

    def __init__(self, queue: WebhookQueue, producer: BatchProducer, partitions: int, batch_size: int = 5000):
        self.queue = queue
        self.producer = producer
        self.partitions = partitions
        self.batch_size = batch_size

    async def move_to_kafka(self, token: str) -> int:
        """Send every waiting row (when it is this dispatcher's turn); returns how many were sent."""
        moved = 0
        if not await self.queue.take_log_turn(token, self.TURN_MS):
            return moved
        try:
            while True:
                rows = await self.queue.log_rows(self.batch_size)
                if not rows:
                    return moved
                outputs = Outputs(self.partitions)
                for _, webhook_id, row in rows:
                    outputs.add(WEBHOOK_DELIVERIES, webhook_id, row)
                await self.producer.send(outputs)
                await self.queue.forget_log_rows([entry_id for entry_id, _, _ in rows])
                moved += len(rows)
                if len(rows) < self.batch_size or not await self.queue.take_log_turn(token, self.TURN_MS):
                    return moved
        finally:
            await self.queue.end_log_turn(token)


# --- connections ----------------------------------------------------------------------------------


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """The dispatcher's only way to open a connection: it resolves the host itself, refuses it unless every
    address is an allowed target, and connects to one of exactly those addresses. What was checked is what is
    connected to; the TLS handshake still verifies the certificate against the host name."""

    def __init__(self, targets: WebhookTargets):
        self.targets = targets
        self.inner = httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int, timeout_s: float | None) -> list[IPAddress]:
        """Every address `host` resolves to, in the resolver's order: one lookup per connection."""
        try:
            async with asyncio.timeout(timeout_s):
                answers = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror}") from None
        addresses: list[IPAddress] = []
        for _, _, _, _, sockaddr in answers:
            ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            if ip not in addresses:
                addresses.append(ip)
        return addresses

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options=None) -> httpcore.AsyncNetworkStream:
        addresses = await self.resolve(host, port, timeout)
        problem = self.targets.refusal(host, addresses)
        if problem:
            raise TargetRefused(problem)
        failure: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for ip in addresses:
            try:
                return await self.inner.connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options=None) -> httpcore.AsyncNetworkStream:
        raise TargetRefused("a unix socket is not a webhook target")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


# --- dispatcher -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchOptions:
    """How hard one dispatcher process pushes. `lease_s` must exceed `request_timeout_s` (a hard deadline
    per attempt), so a claim never expires while its attempt is still running."""

    max_in_flight: int = 64
    per_endpoint: int = 4  # concurrent attempts per URL: a slow endpoint holds at most this many slots
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 15.0
    lease_s: float = 60.0
    poll_s: float = 0.2
    log_flush_s: float = 1.0  # how often the delivery log moves on to Kafka
    breaker_failures: int = 5
    breaker_cooldown_s: float = 60.0
    finished_retention_s: float = 30 * 86400.0
    prune_every_s: float = 60.0

    def __post_init__(self) -> None:
        if self.lease_s <= self.request_timeout_s:
            raise ValueError("lease_s must be longer than request_timeout_s")


class WebhookDispatcher:
    """Claims due deliveries and posts them, each attempt in its own task so a slow or dead endpoint only
    ever holds its own `per_endpoint` slots. Safe to run in several processes on one queue."""

    def __init__(self, queue: WebhookQueue, delivery_log: DeliveryLog, *, targets: WebhookTargets = WebhookTargets(),
                 policy: RetryPolicy = RetryPolicy(), options: DispatchOptions = DispatchOptions(),
                 environ: Mapping[str, str] = os.environ, rng: random.Random | None = None):
        self.queue = queue
        self.delivery_log = delivery_log
        self.targets = targets
        self.policy = policy
        self.options = options
        self.environ = environ
        self.rng = rng or random.Random()
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.breakers: dict[str, CircuitBreaker] = {}
        self._in_flight: set[asyncio.Task] = set()
        self._per_endpoint: Counter[str] = Counter()

    def breaker(self, url: str) -> CircuitBreaker:
        if url not in self.breakers:
            self.breakers[url] = CircuitBreaker(self.options.breaker_failures, self.options.breaker_cooldown_s)
        return self.breakers[url]

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then let running attempts finish and move the log on once more. The
        log moves in the background, so a slow or unreachable Kafka never holds up deliveries (its rows wait
        in Redis)."""
        moving: asyncio.Task | None = None
        last_move = last_prune = 0.0
        async with httpcore.AsyncConnectionPool(
                ssl_context=httpx.create_ssl_context(), max_connections=self.options.max_in_flight,
                max_keepalive_connections=20, keepalive_expiry=5.0,
                network_backend=GuardedNetworkBackend(self.targets)) as pool:
            try:
                while not stop.is_set():
                    started, idle_s = 0, self.options.poll_s
                    try:
                        started = await self._claim_and_start(pool)
                        if time.monotonic() - last_prune >= self.options.prune_every_s:
                            last_prune = time.monotonic()
                            await self.queue.prune_finished(_now_ms() - int(self.options.finished_retention_s * 1000))
                    except (RedisError, OSError) as exc:
                        idle_s = max(idle_s, 1.0)
                        log.warning("webhook dispatcher: Redis unavailable, retrying: %s", exc)
                    if time.monotonic() - last_move >= self.options.log_flush_s and (moving is None or moving.done()):
                        last_move = time.monotonic()
                        moving = asyncio.create_task(self._move_log())
                    if not started:
                        try:
                            await asyncio.wait_for(stop.wait(), idle_s)
                        except TimeoutError:
                            pass
                if self._in_flight:
                    await asyncio.wait(set(self._in_flight))
            finally:
                for task in list(self._in_flight):
                    task.cancel()
                if moving is not None:  # a move stuck on Kafka must not hold the stop: the last move redoes it
                    await asyncio.wait({moving}, timeout=self.options.request_timeout_s)
                    moving.cancel()
                await self._move_log(timeout_s=self.options.request_timeout_s)

    async def _move_log(self, timeout_s: float | None = None) -> None:
        """One move of the delivery log to Kafka; a failure only delays it (the rows stay in Redis)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.delivery_log.move_to_kafka(self.token)
        except Exception as exc:  # noqa: BLE001 - Kafka or Redis unavailable: the next move retries
            log.warning("webhook delivery log: moving rows to Kafka failed, they wait in Redis: %s", exc)

    async def _claim_and_start(self, pool: httpcore.AsyncConnectionPool) -> int:
        """Claim what this process has room for and start an attempt for each; returns how many started."""
        room = self.options.max_in_flight - len(self._in_flight)
        if room <= 0:
            return 0
        now_ms = _now_ms()
        claimed = await self.queue.claim(self.token, now_ms, int(self.options.lease_s * 1000), room)
        busy = []
        for delivery in claimed:
            if self._per_endpoint[delivery.url] >= self.options.per_endpoint:
                busy.append(delivery)
                continue
            self._per_endpoint[delivery.url] += 1
            task = asyncio.create_task(self._attempt(pool, delivery))
            self._in_flight.add(task)
            task.add_done_callback(lambda done, url=delivery.url: self._finished(done, url))
        # A busy endpoint's deliveries go back for a moment instead of waiting here: others come first.
        back_at_ms = now_ms + int(self.options.poll_s * 1000)
        await asyncio.gather(*(self.queue.settle(self.token, d, back_at_ms, now_ms) for d in busy))
        return len(claimed) - len(busy)

    def _finished(self, task: asyncio.Task, url: str) -> None:
        self._in_flight.discard(task)
        self._per_endpoint[url] -= 1
        if self._per_endpoint[url] <= 0:
            del self._per_endpoint[url]
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt crashed; it will be retried when its lease expires",
                      exc_info=task.exception())

    def _signing_key(self, delivery: QueuedWebhook) -> tuple[bytes | None, str]:
        """The endpoint's key from the environment, or why there is none (a permanent failure: fix the
        variable, then replay). Only the delivery's own site's secret variables are ever read."""
        problem = webhook_secret_problem(delivery.site_id, delivery.secret_env)
        if problem:
            return None, problem
        variable = webhook_secret_variable(delivery.site_id, delivery.secret_env)
        secret = self.environ.get(variable)
        if not secret:
            return None, f"secret env var {variable} is not set"
        try:
            return secret_key(secret), ""
        except InvalidSecret as exc:
            return None, f"secret env var {variable}: {exc}"

    async def _attempt(self, pool: httpcore.AsyncConnectionPool, delivery: QueuedWebhook) -> None:
        now_s = time.time()
        now_ms = int(now_s * 1000)
        key, problem = self._signing_key(delivery)
        if key is None:
            await self._record(delivery, AttemptResult("permanent", error=problem), now_ms, 0)
            return
        refused = url_problem(delivery.url, self.targets)
        if refused:
            await self._record(delivery, AttemptResult("permanent", error=f"refused: {refused}"), now_ms, 0)
            return
        breaker = self.breaker(delivery.url)
        if not breaker.allow(now_s):
            await self._defer(delivery, int(breaker.retry_at_s(now_s) * 1000), now_ms)
            return
        started = time.monotonic()
        try:
            result = await self._post(pool, delivery, key, int(now_s))
        except Exception as exc:  # noqa: BLE001 - every failure of the request is an outcome to log
            result = classify_exception(exc)
        if result.kind == "retryable":
            breaker.record_failure(time.time())
        else:
            breaker.record_success()
        await self._record(delivery, result, now_ms, int((time.monotonic() - started) * 1000))

    async def _post(self, pool: httpcore.AsyncConnectionPool, delivery: QueuedWebhook, key: bytes,
                    timestamp: int) -> AttemptResult:
        """One signed POST through the guarded pool, within the attempt's hard deadline."""
        url = httpx.URL(delivery.url)
        body = delivery.body.encode()
        headers = {"host": url.netloc.decode("ascii"), "content-type": "application/json",
                   "user-agent": USER_AGENT, **signed_headers(key, delivery.webhook_id, timestamp, body)}
        limit = self.options.request_timeout_s
        timeouts = {"connect": self.options.connect_timeout_s, "read": limit, "write": limit, "pool": limit}
        target = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
        async with asyncio.timeout(limit):
            async with pool.stream("POST", target, headers=headers, content=body,
                                   extensions={"timeout": timeouts}) as response:
                body_start = await _read_start(response)
        answer = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers}
        return classify_response(response.status, answer, body_start, time.time())

    async def _record(self, delivery: QueuedWebhook, result: AttemptResult, now_ms: int, duration_ms: int) -> None:
        updated, outcome, next_ms = next_step(delivery, result, self.policy, now_ms, self.rng)
        row = WebhookDelivery(
            webhook_id=delivery.webhook_id, site_id=delivery.site_id, rule_id=delivery.rule_id, url=delivery.url,
            attempt=updated.attempts, status_code=result.status_code, outcome=outcome,
            error=updated.last_error, duration_ms=duration_ms, ts_ms=now_ms, next_attempt_ms=next_ms or 0,
            board_id=delivery.board_id)
        if not await self.queue.settle(self.token, updated, next_ms, _now_ms(), row):
            log.warning("webhook %s: lease lost before the attempt was recorded; its owner makes it again",
                        delivery.webhook_id)

    async def _defer(self, delivery: QueuedWebhook, retry_at_ms: int, now_ms: int) -> None:
        """The endpoint's breaker is open: no request and no attempt used, but the retry budget runs (from
        the first deferral when nothing was tried yet), so a dead endpoint's backlog fails in the end."""
        deferred = replace(delivery, round_started_ms=delivery.round_started_ms or now_ms)
        budget_end_ms = deferred.round_started_ms + int(self.policy.total_budget_s * 1000)
        if retry_at_ms > budget_end_ms:
            reason = "circuit breaker open past the retry budget"
            if delivery.last_error:
                reason += f"; last error: {delivery.last_error}"
            await self._record(deferred, AttemptResult("permanent", error=reason), now_ms, 0)
            return
        row = WebhookDelivery(
            webhook_id=delivery.webhook_id, site_id=delivery.site_id, rule_id=delivery.rule_id, url=delivery.url,
            attempt=delivery.attempts + 1, status_code=0, outcome="circuit_open",
            error="circuit breaker open for this endpoint", duration_ms=0, ts_ms=now_ms,
            next_attempt_ms=retry_at_ms, board_id=delivery.board_id)
        await self.queue.settle(self.token, deferred, retry_at_ms, now_ms, row)


async def _read_start(response: httpcore.Response, limit: int = 512) -> str:
    """The first bytes of a response, for the log: an endpoint's huge reply is never read whole."""
    chunk = b""
    async for part in response.aiter_stream():
        chunk += part
        if len(chunk) >= limit:
            break
    return chunk[:limit].decode("utf-8", "replace").strip()


# --- entry points for the CLI and the worker --------------------------------------------------------


async def run_dispatcher(settings: Settings, stop: asyncio.Event, *, policy: RetryPolicy = RetryPolicy(),
                         options: DispatchOptions = DispatchOptions()) -> None:
    """The `webhooks` processor: one dispatcher on the configured Redis and Kafka until `stop` is set."""
    targets = WebhookTargets.parse(settings.webhook_allowed_targets)
    redis = redis_from_url(settings.redis_url)
    producer = BatchProducer(settings.kafka(), EVENTS_DLQ)
    try:
        await producer.start()
        queue = WebhookQueue(redis, settings.name("ls"))
        dispatcher = WebhookDispatcher(queue, DeliveryLog(queue, producer, settings.partitions), targets=targets,
                                       policy=policy, options=options)
        await dispatcher.run(stop)
    finally:
        await producer.stop()
        await redis.aclose()


async def replay(settings: Settings, webhook_id: str) -> Literal["requeued", "already_pending"]:
    """`leadstream webhooks replay ID`: raises UnknownWebhook when the id is not known."""
    redis = redis_from_url(settings.redis_url)
    try:
        return await WebhookQueue(redis, settings.name("ls")).replay(webhook_id)
    finally:
        await redis.aclose()
