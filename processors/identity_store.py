"""Redis adapter for the identity graph: batched prefetch, one lock, writes inside the batch commit.

The graph is global per site (an email's lead is shared by visitors on every partition), so unlike the
sessionizer state it cannot be owned by one partition. Workers therefore take a short Redis lock
around identity work for a batch: read -> resolve (pure core) -> produce -> commit -> release. One
worker never waits on itself; several workers take turns only for this step, which the core does at
tens of thousands of events per second. The lock has a lease, so a crashed holder blocks others for
at most `LOCK_LEASE_MS`; its uncommitted batch is replayed from the same graph by whoever owns the
partition next.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Sequence

import redis.asyncio as aioredis

from processors.accounts import AccountsContext, IpRangeTable
from processors.identity import IdentityChanges, IdentityInput, keys_needed, normalise_email
from schemas.identity import LeadRecord, VisitorLink

LOCK_LEASE_MS = 30_000
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class PrefetchedGraph:
    """An IdentityReader over what one batch prefetched; anything not fetched does not exist."""

    visitors: dict[tuple[str, str], VisitorLink]
    emails: dict[tuple[str, str], str]
    leads: dict[tuple[str, str], LeadRecord]

    def get_visitor_lead(self, site_id: str, visitor_id: str) -> VisitorLink | None:
        return self.visitors.get((site_id, visitor_id))

    def get_email_lead(self, site_id: str, email: str) -> str | None:
        return self.emails.get((site_id, email))

    def get_lead(self, site_id: str, lead_id: str) -> LeadRecord | None:
        lead = self.leads.get((site_id, lead_id))
        return lead.copy() if lead is not None else None


class IdentityGraphStore:
    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis = redis
        self.prefix = prefix
        self._release = redis.register_script(_RELEASE)
        self._token = f"{os.getpid()}-{id(self)}"

    def _key(self, kind: str, site_id: str, ident: str) -> str:
        return f"{self.prefix}:id:{kind}:{site_id}\x1f{ident}"

    async def prefetch(self, events: Sequence[IdentityInput], accounts: AccountsContext) -> PrefetchedGraph:
        """Two round trips: visitors, emails and candidate leads; then leads that visitor links point to."""
        needed = keys_needed(events, accounts)
        emails = sorted({(e.site_id, email) for e in events if e.email for email in (normalise_email(e.email)[0],) if email})
        visitor_keys = [self._key("v", s, v) for s, v in needed.visitors]
        email_keys = [self._key("e", s, m) for s, m in emails]
        lead_keys = [self._key("l", s, lead) for s, lead in needed.leads]
        values = await self.redis.mget(visitor_keys + email_keys + lead_keys) if visitor_keys or email_keys else []
        nv, ne = len(visitor_keys), len(email_keys)
        graph = PrefetchedGraph(
            visitors={k: VisitorLink.from_json(v) for k, v in zip(needed.visitors, values[:nv]) if v},
            emails={k: v.decode() for k, v in zip(emails, values[nv:nv + ne]) if v},
            leads={k: LeadRecord.from_json(v) for k, v in zip(needed.leads, values[nv + ne:]) if v},
        )
        missing = list({(s, link.lead_id) for (s, _), link in graph.visitors.items()} - graph.leads.keys())
        if missing:
            more = await self.redis.mget([self._key("l", s, lead) for s, lead in missing])
            graph.leads.update({k: LeadRecord.from_json(v) for k, v in zip(missing, more) if v})
        return graph

    def write_commands(self, pipe, changes: IdentityChanges) -> None:
        """Queue the batch's graph writes on a pipeline that also carries the session commit."""
        mapping: dict[str, bytes | str] = {}
        for (site, visitor), link in changes.visitors.items():
            mapping[self._key("v", site, visitor)] = link.to_json()
        for (site, email), lead_id in changes.emails.items():
            mapping[self._key("e", site, email)] = lead_id
        for (site, lead_id), lead in changes.leads.items():
            mapping[self._key("l", site, lead_id)] = lead.to_json()
        if mapping:
            pipe.mset(mapping)

    async def acquire(self) -> None:
        key = f"{self.prefix}:id:lock"
        delay = 0.002
        while not await self.redis.set(key, self._token, nx=True, px=LOCK_LEASE_MS):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def release(self) -> None:
        await self._release(keys=[f"{self.prefix}:id:lock"], args=[self._token])

    async def load_ip_table(self) -> IpRangeTable:
        csv_text = await self.redis.get(f"{self.prefix}:ip-ranges")
        if not csv_text:
            return IpRangeTable.from_lines([])[0]
        return IpRangeTable.from_lines(csv_text.decode().splitlines())[0]

    async def save_ip_ranges(self, csv_text: str) -> None:
        await self.redis.set(f"{self.prefix}:ip-ranges", csv_text)


def version_now() -> int:
    """Upsert version for lead and mapping rows: microseconds, taken under the identity lock."""
    return time.time_ns() // 1000
