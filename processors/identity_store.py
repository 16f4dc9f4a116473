"""Redis adapter for the identity graph: batched prefetch, one fenced lock, writes inside the batch commit.

The graph is global per site (an email's lead is shared by visitors on every partition), so unlike the
sessionizer state it cannot be owned by one partition. Workers therefore take a short Redis lock
around identity work for a batch: read -> resolve (pure core) -> produce -> commit -> release. One
worker never waits on itself; several workers take turns only for this step, which the core does at
tens of thousands of events per second. The lock has a lease, so a crashed holder blocks others for
at most `LOCK_LEASE_MS`; its uncommitted batch is replayed from the same graph by whoever owns the
partition next. The lock is fenced: each taking gets a new token, and the batch commit applies only
while the lock still holds it, so a holder whose lease ran out (a slow broker, a long pause) writes
nothing and recomputes its batch from the graph the next holder left.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from processors.identity import IdentityChanges, IdentityInput, keys_needed
from processors.runtime.state import Fence, StateStore, Writes, hold_lock
from schemas.identity import LeadRecord, VisitorLink

LOCK_LEASE_MS = 30_000


@dataclass
class PrefetchedGraph:
    """An IdentityReader over what one batch prefetched; anything not fetched does not exist."""

    visitors: dict[tuple[str, str], VisitorLink]
    leads: dict[tuple[str, str], LeadRecord]

    def get_visitor_lead(self, site_id: str, visitor_id: str) -> VisitorLink | None:
        return self.visitors.get((site_id, visitor_id))

    def get_lead(self, site_id: str, lead_id: str) -> LeadRecord | None:
        lead = self.leads.get((site_id, lead_id))
        return lead.copy() if lead is not None else None


class IdentityGraphStore:
    """The graph's keys live in the raw processor's state store, so they share its transaction."""

    def __init__(self, store: StateStore, prefix: str, lease_ms: int = LOCK_LEASE_MS):
        self.store = store
        self.prefix = prefix
        self.lease_ms = lease_ms

    def _key(self, kind: str, site_id: str, ident: str) -> str:
        return f"{self.prefix}:id:{kind}:{site_id}\x1f{ident}"

    async def prefetch(self, events: Sequence[IdentityInput]) -> PrefetchedGraph:
        """Two round trips: visitors and candidate leads; then leads that visitor links point to (and a third
        in the rare batch that meets a visitor still pointing at a merged lead)."""
        needed = keys_needed(events)
        visitor_keys = [self._key("v", s, v) for s, v in needed.visitors]
        lead_keys = [self._key("l", s, lead) for s, lead in needed.leads]
        loaded = await self.store.load(visitor_keys + lead_keys)
        graph = PrefetchedGraph(
            visitors={k: VisitorLink.from_json(v) for k, key in zip(needed.visitors, visitor_keys) if (v := loaded[key])},
            leads={k: LeadRecord.from_json(v) for k, key in zip(needed.leads, lead_keys) if (v := loaded[key])},
        )
        linked = {(s, link.lead_id) for (s, _), link in graph.visitors.items()}
        await self._load_leads(graph, linked)
        survivors = {(s, lead.merged_into) for (s, lead_id), lead in graph.leads.items()
                     if lead.merged_into and (s, lead_id) in linked}
        await self._load_leads(graph, survivors)  # rare: unlisted visitors of a capped, merged lead
        return graph

    async def _load_leads(self, graph: PrefetchedGraph, wanted: set[tuple[str, str]]) -> None:
        missing = list(wanted - graph.leads.keys())
        if missing:
            keys = [self._key("l", s, lead) for s, lead in missing]
            loaded = await self.store.load(keys)
            graph.leads.update({k: LeadRecord.from_json(v) for k, key in zip(missing, keys) if (v := loaded[key])})

    def write_commands(self, pipe: Writes, changes: IdentityChanges) -> None:
        """Queue the batch's graph writes into the transaction that also carries the session commit."""
        mapping: dict[str, bytes | str] = {}
        for (site, visitor), link in changes.visitors.items():
            mapping[self._key("v", site, visitor)] = link.to_json()
        for (site, lead_id), lead in changes.leads.items():
            mapping[self._key("l", site, lead_id)] = lead.to_json()
        if mapping:
            pipe.mset(mapping)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[Fence]:
        """The graph is global per site: one worker at a time reads, resolves, produces and commits it.
        Yields the lock's fence, for the commit to check."""
        fence = await hold_lock(self.store, "id:lock", self.lease_ms)
        try:
            yield fence
        finally:
            await self.store.release(fence)


def version_now() -> int:
    """Upsert version for lead and mapping rows: microseconds, taken under the identity lock."""
    return time.time_ns() // 1000
