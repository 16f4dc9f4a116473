"""Company enrichment providers: a card for an account domain nobody loaded one for, filled in off the hot
path, with a rate limit, cached negative answers and a circuit breaker.

The raw processor queues the account domains it links that have no card (only when a provider is set:
`LEADSTREAM_COMPANY_PROVIDER_URL`); `CompanyResolver` takes due domains from that queue, asks the provider
and publishes what it learns like a loaded file (Redis for the processors, the `companies` topic for
ClickHouse). Nothing waits for it: a lead's account is linked at once and its card, if the provider knows
the company, appears within seconds, read by the next rule that asks.

A provider is anything with `look_up(domain) -> Company | None` that raises `ProviderError` when it
cannot answer; `HttpJsonProvider` asks an HTTP service that answers a JSON object with the card's fields
(`domain`, `name`, `industry`, `employees`, `country`, `website`, `linkedin_url`, `logo_url`; other keys are
ignored). What can go wrong, and what happens:
- the provider does not know the domain (404, an empty answer): a negative answer, cached for
  NEGATIVE_TTL_S, so the domain is not asked again for a week;
- it times out, fails (5xx, connection refused) or answers garbage (not JSON, a card that does not
  validate, another company's domain): cached as a negative answer for FAILED_TTL_S, and counted by the
  breaker; after BREAKER_FAILURES failures in a row the breaker opens and nobody is asked for
  BREAKER_OPEN_S, then one probe decides. The queue keeps the domains meanwhile;
- the queue grows faster than the rate limit allows: it waits; a domain is queued once however many
  leads link to it.
The pure parts (rate limit, breaker, reading an answer) take the time as an argument and are tested
without servers; the loop is tested against a stand-in HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx
import orjson
import redis.asyncio as aioredis

from processors.companies import CompanyDirectory, CompanyStore, parse_company
from schemas.companies import COMPANY_FIELDS, Company

log = logging.getLogger(__name__)

NEGATIVE_TTL_S = 7 * 86_400
FAILED_TTL_S = 3_600
BREAKER_FAILURES = 5
BREAKER_OPEN_S = 60.0
CLAIM_BATCH = 20
IDLE_POLL_S = 1.0


class ProviderError(Exception):
    """The provider could not answer: a timeout, an error, or an answer that is no card."""


class CompanyProvider(Protocol):
    name: str

    async def look_up(self, domain: str) -> Company | None:
        """The card, or None when the provider does not know the domain. Raises ProviderError."""
        ...

    async def close(self) -> None:
        """Release connections (the worker is stopping)."""
        ...


def card_from_answer(domain: str, answer: Any, source: str, now_ms: int) -> Company | None:
    """A provider's JSON answer as a card for `domain`: None for "unknown" (null, an empty object);
    ProviderError for anything else that is not a valid card of that domain."""
    if answer is None or answer == {}:
        return None
    if not isinstance(answer, dict):
        raise ProviderError(f"answer is not a JSON object: {str(answer)[:80]!r}")
    fields = {key: answer[key] for key in COMPANY_FIELDS if key in answer and key != "source"}
    fields["domain"] = fields.get("domain") or domain
    card = parse_company(fields, source, now_ms)
    if isinstance(card, str):
        raise ProviderError(f"answer is no valid card: {card}")
    if card.domain != domain:
        raise ProviderError(f"answer is about {card.domain}, not {domain}")
    return card


class HttpJsonProvider:
    """GET `url_template` with `{domain}` filled in; 200 with a JSON object is a card, 404 or 204 "unknown"."""

    def __init__(self, url_template: str, token: str = "", timeout_s: float = 2.0) -> None:
        if "{domain}" not in url_template:
            raise ValueError("the provider URL must contain {domain}")
        self.url_template = url_template
        self.name = f"provider:{urlsplit(url_template).hostname or 'http'}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(timeout=timeout_s, headers=headers, follow_redirects=False)

    async def look_up(self, domain: str) -> Company | None:
        try:
            response = await self.client.get(self.url_template.format(domain=quote(domain, safe="")))
        except httpx.HTTPError as error:
            raise ProviderError(f"{type(error).__name__}: {error}") from error
        if response.status_code in (204, 404):
            return None
        if response.status_code != 200:
            raise ProviderError(f"HTTP {response.status_code}")
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError as error:
            raise ProviderError(f"answer is not JSON: {error}") from error
        return card_from_answer(domain, answer, self.name, int(time.time() * 1000))

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(slots=True)
class RateLimit:
    """A token bucket: `per_minute` look-ups a minute, in bursts of at most `burst`."""

    per_minute: int
    burst: int = 1
    tokens: float = 1.0
    at_s: float = 0.0

    def wait_s(self, now_s: float) -> float:
        """Take a token if there is one (0.0), else how long until there is."""
        rate = self.per_minute / 60.0
        self.tokens = min(float(self.burst), self.tokens + (now_s - self.at_s) * rate)
        self.at_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


@dataclass(slots=True)
class Breaker:
    """Closed: every look-up goes. After `failures_to_open` failures in a row: open for `open_s`, then
    half-open: one look-up goes, and its outcome closes or reopens the breaker."""

    failures_to_open: int = BREAKER_FAILURES
    open_s: float = BREAKER_OPEN_S
    failures: int = 0
    open_until_s: float = 0.0
    probing: bool = False

    def blocked(self, now_s: float) -> bool:
        """Whether a look-up must wait (open, or half-open with its probe under way)."""
        return self.failures >= self.failures_to_open and (now_s < self.open_until_s or self.probing)

    def allows(self, now_s: float) -> bool:
        """Whether a look-up may go now; in half-open state this one is the probe."""
        if self.blocked(now_s):
            return False
        if self.failures >= self.failures_to_open:
            self.probing = True
        return True

    def record(self, ok: bool, now_s: float) -> None:
        self.probing = False
        if ok:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.failures_to_open:
            self.open_until_s = now_s + self.open_s


class CompanyResolver:
    """The loop: claim due domains from the queue, skip those with a card or a cached negative answer, ask
    the provider within the rate limit and the breaker, publish the cards it knows."""

    def __init__(self, redis: aioredis.Redis, prefix: str, provider: CompanyProvider, per_minute: int,
                 publish: Callable[[list[Company]], Awaitable[None]], companies: CompanyDirectory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.store = CompanyStore(redis, prefix)
        self.provider = provider
        self.rate = RateLimit(per_minute)
        self.breaker = Breaker()
        self.publish = publish
        self.companies = companies
        self.clock = clock

    async def claim(self, limit: int = CLAIM_BATCH) -> list[str]:
        """Take up to `limit` due domains off the queue (ZREM decides, so two resolvers never share one)."""
        now_ms = int(time.time() * 1000)
        due = await self.redis.zrangebyscore(self.store.wanted_key, "-inf", now_ms, start=0, num=limit)
        claimed = []
        for raw in due:
            if await self.redis.zrem(self.store.wanted_key, raw):
                claimed.append(raw.decode())
        return claimed

    async def resolve(self, domain: str) -> str:
        """Ask about one claimed domain; returns what happened (for the log and the tests)."""
        if self.companies.get(domain) is not None or await self.redis.exists(self.store.miss_key(domain)):
            return "skipped"
        while (wait := self.rate.wait_s(self.clock())) > 0:
            await asyncio.sleep(wait)
        if not self.breaker.allows(self.clock()):  # another look-up is the probe: this domain waits its turn
            await self.redis.zadd(self.store.wanted_key, {domain: int(time.time() * 1000)}, nx=True)
            return "deferred"
        try:
            card = await self.provider.look_up(domain)
        except ProviderError as error:
            self.breaker.record(False, self.clock())
            await self.redis.set(self.store.miss_key(domain), b"failed", ex=FAILED_TTL_S)
            log.warning("company provider failed for %s: %s", domain, error)
            return "failed"
        self.breaker.record(True, self.clock())
        if card is None:
            await self.redis.set(self.store.miss_key(domain), b"unknown", ex=NEGATIVE_TTL_S)
            return "unknown"
        await self.publish([card])
        return "found"

    async def run(self, stopped: asyncio.Event) -> None:
        while not stopped.is_set():
            if self.breaker.blocked(self.clock()):  # the provider is down: the queue keeps the domains
                domains = []
            else:
                try:
                    domains = await self.claim()
                    for domain in domains:
                        await self.resolve(domain)
                except Exception:  # noqa: BLE001 - Redis down, a bug: log, wait, go on
                    log.exception("company resolver failed; retrying")
                    domains = []
            if not domains:
                try:
                    await asyncio.wait_for(stopped.wait(), IDLE_POLL_S)
                except TimeoutError:
                    pass
