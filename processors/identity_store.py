"""The identity graph as declared state: batched prefetch, one fenced lock, writes inside the batch commit.

The graph is global per site (an email's lead is shared by visitors on every partition), so unlike the
sessionizer state it cannot be owned by one partition. Workers therefore take a short Redis lock per
site around identity work for a batch: read -> resolve (pure core) -> produce -> commit -> release. A
batch holds the locks of the sites it carries (taken in sorted order, so two workers never wait on each
other in a circle); workers busy with different sites never wait on each other. One worker never waits
on itself; several workers of one site take turns only for this step, which the core does at tens of
thousands of events per second. No site's graph references another's, so a site's lock covers all of
what its identity work reads and writes. The lock has a lease, so a crashed holder blocks others for
at most `LOCK_LEASE_MS`; its uncommitted batch is replayed from the same graph by whoever owns the
partition next. The lock is fenced: each taking gets a new token, and the batch commit applies only
while the lock still holds it, so a holder whose lease ran out (a slow broker, a long pause) writes
nothing and recomputes its batch from the graph the next holder left.

Visitor links and lead records are two global kinds of state (`StateSpec`, partition None): loaded and
written through the batch, committed with the raw processor's states, never expiring.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Sequence

from processors.identity import IdentityChanges, IdentityInput, keys_needed
from processors.runtime.batch import Batch
from processors.runtime.state import Fence, StateSpec, StateStore, hold_locks
from schemas.identity import LeadRecord, VisitorLink
from schemas.redis_keys import RedisKeys, identity_lock

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
    """The graph's lock lives in the raw processor's state store; its keys are written in that processor's
    transaction."""

    def __init__(self, store: StateStore, prefix: str, lease_ms: int = LOCK_LEASE_MS):
        self.store = store
        self.lease_ms = lease_ms
        keys = RedisKeys(prefix)
        self.visitors = StateSpec("identity-visitor", keys.identity_visitor, VisitorLink.to_json,
                                  VisitorLink.from_json)
        self.leads = StateSpec("identity-lead", keys.identity_lead, LeadRecord.to_json, LeadRecord.from_json)

    async def prefetch(self, batch: Batch, events: Sequence[IdentityInput]) -> PrefetchedGraph:
        """Two round trips: visitors and candidate leads; then leads that visitor links point to (and a third
        in the rare batch that meets a visitor still pointing at a merged lead)."""
        needed = keys_needed(events)
        visitor_keys = {self.visitors.key(s, v): (s, v) for s, v in needed.visitors}
        lead_keys = {self.leads.key(s, lead): (s, lead) for s, lead in needed.leads}
        await batch.load((self.visitors, dict.fromkeys(visitor_keys)), (self.leads, dict.fromkeys(lead_keys)))
        graph = PrefetchedGraph(
            visitors={ids: link for key, ids in visitor_keys.items() if (link := batch.get(self.visitors, key))},
            leads={ids: lead for key, ids in lead_keys.items() if (lead := batch.get(self.leads, key))},
        )
        linked = {(s, link.lead_id) for (s, _), link in graph.visitors.items()}
        await self._load_leads(batch, graph, linked)
        survivors = {(s, lead.merged_into) for (s, lead_id), lead in graph.leads.items()
                     if lead.merged_into and (s, lead_id) in linked}
        await self._load_leads(batch, graph, survivors)  # rare: unlisted visitors of a capped, merged lead
        return graph

    async def _load_leads(self, batch: Batch, graph: PrefetchedGraph, wanted: set[tuple[str, str]]) -> None:
        missing = {self.leads.key(s, lead): (s, lead) for s, lead in wanted - graph.leads.keys()}
        if missing:
            await batch.load((self.leads, dict.fromkeys(missing)))
            graph.leads.update({ids: lead for key, ids in missing.items() if (lead := batch.get(self.leads, key))})

    def write(self, batch: Batch, changes: IdentityChanges) -> None:
        """The batch's graph changes, committed with the raw processor's states."""
        for (site, visitor), link in changes.visitors.items():
            batch.put(self.visitors, self.visitors.key(site, visitor), link)
        for (site, lead_id), lead in changes.leads.items():
            batch.put(self.leads, self.leads.key(site, lead_id), lead)

    @contextlib.asynccontextmanager
    async def locked(self, sites: Iterable[str]) -> AsyncIterator[list[Fence]]:
        """The graph is global per site: one worker at a time reads, resolves, produces and commits a
        site's graph. Yields the fences of the sites' locks (none for no site), for the commit to check."""
        fences = await hold_locks(self.store, [identity_lock(site) for site in set(sites)], self.lease_ms)
        try:
            yield fences
        finally:
            for fence in fences:
                await self.store.release(fence)

