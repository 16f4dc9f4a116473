"""Erasure (right to be forgotten) and the access request: the pure half.

An erased person is recorded in the **erasure ledger** (a Redis hash, schemas/redis_keys.py) so that Kafka,
which still holds their raw events, can never bring them back: the raw, lead and board processors drop
every later record of theirs, and so do a replay, a rebalance and `boards rebuild`. The ledger names a
person by what the pipeline sees, never by their email in clear:

  v \\x1f site \\x1f visitor_id      a visitor (cookie id) of theirs
  l \\x1f site \\x1f lead_id         a lead of theirs (known leads' ids are themselves a digest of the email)
  e \\x1f site \\x1f hmac(email)     their normalised email, as a keyed HMAC-SHA256 (key: LEADSTREAM_ERASURE_KEY,
                                   else one generated once and kept in Redis), so a new device that
                                   identifies with the same email is dropped too

Each field's value is the erasure id that put it there. The ledger's version (an integer bumped by every
erasure) is what a processor reads once per batch; the ledger itself is read again only when it moved.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from schemas.records import JsonRecord
from schemas.redis_keys import SEP

VISITOR, LEAD, EMAIL = "v", "l", "e"


def email_digest(key: bytes, site_id: str, email: str) -> str:
    """The ledger's name for an email on a site: HMAC-SHA256 under the erasure key of the site and the
    normalised (trimmed, lower-cased) email."""
    normalised = email.strip().lower()
    return hmac.new(key, f"{site_id}{SEP}{normalised}".encode(), hashlib.sha256).hexdigest()


def ledger_field(kind: str, site_id: str, ident: str) -> str:
    if kind not in (VISITOR, LEAD, EMAIL):
        raise ValueError(f"unknown ledger entry kind {kind!r}")
    return f"{kind}{SEP}{site_id}{SEP}{ident}"


def ledger_fields(site_id: str, visitor_ids: Iterable[str] = (), lead_ids: Iterable[str] = (),
                  email_digests: Iterable[str] = ()) -> list[str]:
    return ([ledger_field(VISITOR, site_id, v) for v in sorted(set(visitor_ids))]
            + [ledger_field(LEAD, site_id, lead) for lead in sorted(set(lead_ids))]
            + [ledger_field(EMAIL, site_id, d) for d in sorted(set(email_digests))])


@dataclass(frozen=True)
class Ledger:
    """Who is erased, as the processors test it. `key` is the HMAC key emails are compared under."""

    key: bytes = b""
    visitors: frozenset[tuple[str, str]] = frozenset()
    leads: frozenset[tuple[str, str]] = frozenset()
    emails: frozenset[tuple[str, str]] = frozenset()
    sites: frozenset[str] = field(default=frozenset())

    @classmethod
    def of(cls, fields: Iterable[str | bytes], key: bytes = b"") -> Ledger:
        parts: dict[str, set[tuple[str, str]]] = {VISITOR: set(), LEAD: set(), EMAIL: set()}
        for raw in fields:
            text = raw.decode() if isinstance(raw, bytes) else raw
            kind, site_id, ident = (text.split(SEP, 2) + ["", ""])[:3]
            if kind in parts and site_id and ident:
                parts[kind].add((site_id, ident))
        sites = frozenset(site for entries in parts.values() for site, _ in entries)
        return cls(key, frozenset(parts[VISITOR]), frozenset(parts[LEAD]), frozenset(parts[EMAIL]), sites)

    def __bool__(self) -> bool:
        return bool(self.sites)

    def drops(self, site_id: str, visitor_id: str = "", lead_id: str = "", email: str = "") -> bool:
        """Whether a record of this site, visitor, lead or email belongs to an erased person. Cheap when the
        site has no erasure (one set lookup); an email is digested only then."""
        if site_id not in self.sites:
            return False
        if visitor_id and (site_id, visitor_id) in self.visitors:
            return True
        if lead_id and (site_id, lead_id) in self.leads:
            return True
        return bool(email) and bool(self.emails) and (site_id, email_digest(self.key, site_id, email)) in self.emails


EMPTY = Ledger()


# -- the erasure job's record (Redis) and its audit row (ClickHouse `erasures`): no personal data ---------

PENDING, DONE = "pending", "done"


@dataclass(slots=True)
class ErasureJob(JsonRecord):
    """One erasure as its status answers it. `counts`: rows or keys removed per table or store (ClickHouse
    tables by name, Redis stores as `redis:<store>`). `mutations`: (table, mutation id) of the ClickHouse
    DELETE mutations it started; it is done when all of them are."""

    erasure_id: str
    site_id: str
    requested_by: str
    requested_ms: int
    status: str = PENDING
    finished_ms: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    mutations: list[list[str]] = field(default_factory=list)

    def public(self) -> dict:
        return {"id": self.erasure_id, "site_id": self.site_id, "status": self.status,
                "requested_by": self.requested_by, "requested_ms": self.requested_ms,
                "finished_ms": self.finished_ms or None, "counts": dict(sorted(self.counts.items()))}


def audit_row(job: ErasureJob, version: int) -> tuple:
    """The job as a row of `erasures` (migration 0016), in its column order."""
    stores = sorted(job.counts)
    return (job.erasure_id, job.site_id, job.requested_by, job.requested_ms, job.finished_ms, job.status,
            stores, [int(job.counts[s]) for s in stores], version)


AUDIT_COLUMNS = ("erasure_id", "site_id", "requested_by", "requested_ms", "finished_ms", "status", "stores",
                 "counts", "version")


def total(counts: Mapping[str, int]) -> int:
    return sum(counts.values())


def queue_ledger_entries(writes, keys, fields: Iterable[str], erasure_id: str) -> None:
    """Add entries to the ledger and bump its version, on a `Writes` target (processors/runtime/writes.py:
    a Redis MULTI pipeline, or the in-memory twin): every batch that read the old version then fails its
    commit and is computed again with the person erased."""
    entries = {f: erasure_id for f in fields}
    if entries:
        writes.hash_set(keys.erasure_ledger, entries)
        writes.increment(keys.erasure_version)
