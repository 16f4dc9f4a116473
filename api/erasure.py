"""Erasure (right to be forgotten) and the access request: the service behind `POST /erasures`,
`GET /people/{email}/export` and `leadstream erase` / `leadstream export-person`.

An erasure, in this order:
  1. finds the person: their leads (the known lead of the email, leads merged into it, a lead given by id)
     and visitors (the identity graph in Redis, `visitor_leads` and `events` in ClickHouse);
  2. writes them into the erasure ledger (schemas/erasure.py) and bumps its version, in one transaction:
     from then on every processor drops their records, and a batch a worker computed before this fails
     its commit (the batch guards the version) and is computed again without them;
  3. deletes their Redis state: visitor blobs and identity links, lead records and lead state, their cards
     (card state, board views, column entries, notes, feed entries), timer entries, queued webhooks and
     delivery-log rows not yet in Kafka;
  4. counts their rows in every ClickHouse table that holds them and starts one `ALTER TABLE … DELETE`
     mutation per table that has any (ClickHouse rewrites the parts in the background);
  5. records the job (Redis) and its audit row (`erasures`, migration 0016): ids, who asked, when,
     counts per table or store — never an email or a visitor id.
It is `pending` until every mutation it started is done (system.mutations.is_done) and a second look by the
ids the ledger holds for it finds no row that landed meanwhile (else that look starts more mutations), then
`done`.

The mutations' text names visitor, lead, card and webhook ids, never the email: ClickHouse keeps the text of
its last finished mutations (system.mutations) for a while.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from processors.definitions_store import DefinitionsStore
from processors.identity import known_lead_id, normalise_email
from processors.boards import CardState
from schemas.boards import account_card_id, lead_card_id
from schemas.erasure import (AUDIT_COLUMNS, DONE, LEAD, PENDING, VISITOR, ErasureJob, audit_row, email_digest,
                             ledger_fields, queue_ledger_entries)
from processors.runtime.writes import RedisWrites
from schemas.identity import LeadRecord
from schemas.redis_keys import SEP, RedisKeys
from schemas.settings import ClickHouseConfig
from sinks import clickhouse

JOB_TTL_S = 400 * 24 * 3600  # an erasure's status answers for a bit over a year (the audit row stays)
ERASURE_ID_CHARS = 19  # "er_" + 16 hex


class InvalidPerson(ValueError):
    """The request names no one this service can look up (a malformed email, an empty lead id)."""


@dataclass
class Person:
    """Who an erasure or an export is about, as the stores know them. `email` is normalised ('' if not given)."""

    site_id: str
    email: str = ""
    leads: set[str] = field(default_factory=set)
    visitors: set[str] = field(default_factory=set)
    webhooks: set[str] = field(default_factory=set)
    accounts: set[str] = field(default_factory=set)  # domains of their leads' accounts (the account cards list leads)

    @property
    def cards(self) -> set[str]:
        return {lead_card_id(lead) for lead in self.leads}


# table -> the person's rows in it: (column, which ids) alternatives, OR-ed, within the site
_BY: dict[str, tuple[tuple[str, str], ...]] = {
    "events": (("visitor_id", "visitors"), ("lead_id", "leads")),
    "sessions": (("visitor_id", "visitors"),),
    "identity_events": (("visitor_id", "visitors"), ("lead_id", "leads"), ("from_lead_id", "leads")),
    "visitor_leads": (("visitor_id", "visitors"), ("lead_id", "leads")),
    "visitors_by_lead": (("visitor_id", "visitors"), ("lead_id", "leads")),
    "leads": (("lead_id", "leads"), ("merged_into", "leads")),
    "leads_by_account": (("lead_id", "leads"),),
    "lead_changes": (("lead_id", "leads"),),
    "lead_state": (("lead_id", "leads"),),
    "rule_executions": (("lead_id", "leads"),),
    "stage_changes": (("card_id", "cards"),),
    "segment_membership": (("member_id", "leads"),),
    "webhook_deliveries": (("webhook_id", "webhooks"),),
}
TABLES = (*_BY, "dlq")
"""Every ClickHouse table that can hold a person's rows (`dlq`: dead letters whose raw message names one of
their visitors; `companies`, `manual_accounts` and the audit tables hold no person)."""


def condition(table: str, person: Person, tag: str = "") -> tuple[str, dict[str, Any]] | None:
    """The WHERE clause of the person's rows in `table` and its parameters (None: nothing to look for).
    `tag` (an erasure id) is written into the clause so its mutation can be found in system.mutations."""
    params: dict[str, Any] = {"site": person.site_id}
    if table == "dlq":
        needles = [f'"visitor_id":"{v}"' for v in sorted(person.visitors)]
        if not needles:
            return None
        params.update({f"n{i}": needle for i, needle in enumerate(needles)})
        params["site_json"] = f'"site_id":"{person.site_id}"'
        any_needle = " OR ".join(f"position(raw, %(n{i})s) > 0" for i in range(len(needles)))
        where = f"position(raw, %(site_json)s) > 0 AND ({any_needle})"
    else:
        parts = []
        for column, which in _BY[table]:
            ids = sorted(i for i in getattr(person, which) if i)
            if ids:
                params[which] = tuple(ids)
                parts.append(f"{column} IN %({which})s")
        if not parts:
            return None
        where = f"site_id = %(site)s AND ({' OR '.join(parts)})"
    if tag:
        params["tag"] = tag
        where += " AND %(tag)s != ''"
    return where, params


class Erasures:
    def __init__(self, redis: aioredis.Redis, prefix: str, clickhouse_config: ClickHouseConfig, erasure_key: str = ""):
        self.redis = redis
        self.keys = RedisKeys(prefix)
        self.definitions = DefinitionsStore(redis, prefix)
        self.clickhouse_config = clickhouse_config
        self.erasure_key = erasure_key

    # -- finding the person ---------------------------------------------------------------------------

    async def key(self) -> bytes:
        """The ledger's HMAC key: the setting, else the generated one (made by the first erasure)."""
        if self.erasure_key:
            return self.erasure_key.encode()
        await self.redis.set(self.keys.erasure_key, secrets.token_hex(32), nx=True)
        return await self.redis.get(self.keys.erasure_key)

    async def find(self, site_id: str, email: str = "", lead_id: str = "") -> Person:
        person = Person(site_id)
        if email:
            normalised, problem = normalise_email(email)
            if problem:
                raise InvalidPerson(f"not an email address ({problem})")
            person.email = normalised
            person.leads.add(known_lead_id(site_id, normalised))
        if lead_id:
            person.leads.add(lead_id)
        if not person.leads:
            raise InvalidPerson("give an email or a lead id")
        for lead in list(person.leads):
            blob = await self.redis.get(self.keys.identity_lead(site_id, lead))
            if blob:
                record = LeadRecord.from_json(blob)
                person.visitors.update(record.visitors)
                if record.account_domain:
                    person.accounts.add(record.account_domain)
                if record.email and not person.email:
                    person.email = record.email
        rows = await asyncio.to_thread(self._find_in_clickhouse, person)
        person.leads.update(rows["leads"])
        person.visitors.update(rows["visitors"])
        person.webhooks.update(rows["webhooks"])
        person.webhooks.update(await self._queued_webhooks(person))
        return person

    def _find_in_clickhouse(self, person: Person) -> dict[str, set[str]]:
        client = clickhouse.connect(self.clickhouse_config)
        try:
            params = {"site": person.site_id, "leads": tuple(sorted(person.leads)), "email": person.email or "\x00"}
            found = client.execute(
                "SELECT DISTINCT lead_id, account_domain FROM leads WHERE site_id = %(site)s AND "
                "(lead_id IN %(leads)s OR merged_into IN %(leads)s OR email = %(email)s)", params)
            leads = {lead for lead, _ in found}
            person.accounts.update(domain for _, domain in found if domain)
            params["leads"] = tuple(sorted(person.leads | leads))
            visitors = {r[0] for r in client.execute(
                "SELECT DISTINCT visitor_id FROM visitor_leads WHERE site_id = %(site)s AND lead_id IN %(leads)s "
                "UNION ALL SELECT DISTINCT visitor_id FROM events WHERE site_id = %(site)s AND "
                "(lead_id IN %(leads)s OR (email != '' AND email = %(email)s))", params)}
            webhooks = set()
            for (actions,) in client.execute("SELECT actions FROM rule_executions WHERE site_id = %(site)s "
                                             "AND lead_id IN %(leads)s", params):
                webhooks.update(a.split()[1] for a in actions if a.startswith("webhook wh_") and len(a.split()) > 1)
            return {"leads": leads, "visitors": visitors - {""}, "webhooks": webhooks}
        finally:
            client.disconnect()

    async def _queued_webhooks(self, person: Person) -> set[str]:
        needles = [lead.encode() for lead in person.leads] + ([person.email.encode()] if person.email else [])
        found = set()
        async for webhook_id, raw in self.redis.hscan_iter(self.keys.webhook_requests, count=1000):
            record = orjson.loads(raw)
            if record.get("site_id") == person.site_id and any(n in record.get("body", "").encode() for n in needles):
                found.add(webhook_id.decode() if isinstance(webhook_id, bytes) else webhook_id)
        return found

    # -- erasing ----------------------------------------------------------------------------------------

    async def erase(self, site_id: str, requested_by: str, email: str = "", lead_id: str = "") -> ErasureJob:
        person = await self.find(site_id, email, lead_id)
        job = ErasureJob("er_" + secrets.token_hex(8), site_id, requested_by, int(time.time() * 1000))
        key = await self.key()
        digests = [email_digest(key, site_id, person.email)] if person.email else []
        async with self.redis.pipeline(transaction=True) as pipe:
            queue_ledger_entries(RedisWrites(pipe), self.keys,
                                 ledger_fields(site_id, person.visitors, person.leads, digests), job.erasure_id)
            await pipe.execute()
        job.counts.update(await self._erase_redis(person))
        # Again: a batch that loaded state while Redis was being cleaned (after reading the first bump) fails
        # its commit too, and is computed again from the cleaned state.
        await self.redis.incr(self.keys.erasure_version)
        counts, mutations = await asyncio.to_thread(self._erase_clickhouse, person, job.erasure_id)
        job.counts.update(counts)
        job.mutations = mutations
        if not mutations:
            job.status, job.finished_ms = DONE, int(time.time() * 1000)
        await self._save(job)
        return job

    async def _erase_redis(self, person: Person) -> dict[str, int]:
        keys, site, redis = self.keys, person.site_id, self.redis
        counts: dict[str, int] = {}

        async def delete(store: str, names: list[str]) -> None:
            counts[f"redis:{store}"] = await redis.delete(*names) if names else 0

        await delete("visitors", [keys.visitor_state(site, v) for v in person.visitors])
        await delete("identity", [keys.identity_visitor(site, v) for v in person.visitors]
                     + [keys.identity_lead(site, lead) for lead in person.leads])
        await delete("lead_state", [keys.lead_state(site, lead) for lead in person.leads])
        await delete("cards", [keys.card_state(site, card) for card in person.cards])
        timers = {keys.visitor_state(site, v) for v in person.visitors} | {keys.lead_state(site, lead) for lead in person.leads}
        removed = 0
        for processor in ("raw", "lead"):
            async for due in redis.scan_iter(match=keys.due_pattern(processor), count=1000):
                removed += await redis.zrem(due, *timers) if timers else 0
        counts["redis:timers"] = removed
        counts["redis:account_cards"] = await self._erase_from_account_cards(person)
        counts["redis:board_views"] = await self._erase_board_views(person)
        counts["redis:webhooks"] = await self._erase_webhooks(person)
        return counts

    async def _erase_from_account_cards(self, person: Person) -> int:
        """Their leads' facts out of their accounts' cards (an account card keeps facts per lead)."""
        removed = 0
        for domain in sorted(person.accounts):
            key = self.keys.card_state(person.site_id, account_card_id(domain))
            blob = await self.redis.get(key)
            if not blob:
                continue
            card = CardState.from_json(blob)
            gone = [lead for lead in person.leads if lead in card.facts]
            if gone:
                for lead in gone:
                    del card.facts[lead]
                ttl = await self.redis.pttl(key)
                await self.redis.set(key, card.to_json(), px=ttl if ttl and ttl > 0 else None)
                removed += len(gone)
        return removed

    async def _erase_board_views(self, person: Person) -> int:
        keys, site, redis, cards = self.keys, person.site_id, self.redis, sorted(person.cards)
        if not cards:
            return 0
        needles = [c.encode() for c in cards] + [lead.encode() for lead in person.leads]
        removed = 0
        for stored in await self.definitions.list_boards(site):
            board = stored.board.id
            columns = [c async for c in redis.scan_iter(match=keys.board_columns_pattern(site, board), count=1000)]
            feed = keys.board_feed(site, board)
            entries = [entry_id for entry_id, fields in await redis.xrange(feed)
                       if any(n in value for value in fields.values() for n in needles)]
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hdel(keys.board_cards(site, board), *cards)
                pipe.hdel(keys.board_notes(site, board), *cards)
                for column in columns:
                    pipe.zrem(column, *cards)
                if entries:
                    pipe.xdel(feed, *entries)
                pipe.incr(keys.board_version(site, board))  # a stale If-Match never matches again
                results = await pipe.execute()
            removed += sum(results[:-1])
        return removed

    async def _erase_webhooks(self, person: Person) -> int:
        ids = sorted(person.webhooks)
        if not ids:
            return 0
        keys, redis = self.keys, self.redis
        log_entries = [entry_id for entry_id, fields in await redis.xrange(keys.webhook_log)
                       if any(i.encode() in value for value in fields.values() for i in ids)]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.webhook_requests, *ids)
            pipe.zrem(keys.webhook_due, *ids)
            pipe.hdel(keys.webhook_leases, *ids)
            pipe.zrem(keys.webhook_finished, *ids)
            if log_entries:
                pipe.xdel(keys.webhook_log, *log_entries)
            results = await pipe.execute()
        return results[0] + (results[-1] if log_entries else 0)

    def _erase_clickhouse(self, person: Person, erasure_id: str) -> tuple[dict[str, int], list[list[str]]]:
        client = clickhouse.connect(self.clickhouse_config)
        counts, mutations = {}, []
        try:
            for table in TABLES:
                found = condition(table, person)
                if found is None:
                    counts[table] = 0
                    continue
                where, params = found
                counts[table] = int(client.execute(f"SELECT count() FROM {table} WHERE {where}", params)[0][0])
                if counts[table]:
                    where, params = condition(table, person, erasure_id)
                    clickhouse.on_each_shard(self.clickhouse_config,
                                             f"ALTER TABLE {clickhouse.local_table(self.clickhouse_config, table)} "
                                             f"DELETE WHERE {where}", params)
                    mutations.append([table, erasure_id])
            return counts, mutations
        finally:
            client.disconnect()

    # -- status ------------------------------------------------------------------------------------------

    async def _save(self, job: ErasureJob) -> None:
        await self.redis.set(self.keys.erasure_job(job.erasure_id), job.to_json(), ex=JOB_TTL_S)
        await asyncio.to_thread(self._audit, job)

    def _audit(self, job: ErasureJob) -> None:
        client = clickhouse.connect(self.clickhouse_config)
        try:
            clickhouse.insert_columnar(client, "erasures", AUDIT_COLUMNS, [audit_row(job, time.time_ns() // 1000)])
        finally:
            client.disconnect()

    async def status(self, site_id: str, erasure_id: str) -> ErasureJob | None:
        """The job (None: no such erasure on this site); a pending one is checked against system.mutations."""
        if not erasure_id.startswith("er_") or len(erasure_id) > ERASURE_ID_CHARS:
            return None
        blob = await self.redis.get(self.keys.erasure_job(erasure_id))
        if blob is None:
            return None
        job = ErasureJob.from_json(blob)
        if job.site_id != site_id:
            return None
        if job.status == PENDING and await asyncio.to_thread(self._mutations_done, job):
            # Rows produced before the erasure may have reached ClickHouse while its mutations ran: look
            # again (by the ids the ledger holds for this erasure) and delete those too before saying done.
            person = await self._from_ledger(job)
            late, mutations = await asyncio.to_thread(self._erase_clickhouse, person, job.erasure_id)
            if mutations:
                for table, n in late.items():
                    job.counts[table] = job.counts.get(table, 0) + n
                job.mutations += [m for m in mutations if m not in job.mutations]
            else:
                job.status, job.finished_ms = DONE, int(time.time() * 1000)
            await self._save(job)
        return job

    async def _from_ledger(self, job: ErasureJob) -> Person:
        """The visitors and leads this erasure put in the ledger (its own entries: their value is its id)."""
        person = Person(job.site_id)
        async for name, value in self.redis.hscan_iter(self.keys.erasure_ledger, count=1000):
            if value.decode() != job.erasure_id:
                continue
            kind, site, ident = (name.decode() if isinstance(name, bytes) else name).split(SEP, 2)
            if site == job.site_id and kind == VISITOR:
                person.visitors.add(ident)
            elif site == job.site_id and kind == LEAD:
                person.leads.add(ident)
        return person

    def _mutations_done(self, job: ErasureJob) -> bool:
        """Every mutation it started is done, on every shard."""
        config = self.clickhouse_config
        tables = tuple(sorted({clickhouse.local_table(config, table) for table, _ in job.mutations}))
        for rows in clickhouse.on_each_shard(
                config, "SELECT table, min(is_done) FROM system.mutations WHERE database = currentDatabase() "
                        "AND table IN %(tables)s AND position(command, %(tag)s) > 0 GROUP BY table",
                {"tables": tables, "tag": job.erasure_id}):
            if {table for table, is_done in rows if is_done} < set(tables):
                return False
        return True

    async def wait(self, site_id: str, erasure_id: str, timeout_s: float = 600, poll_s: float = 0.5) -> ErasureJob:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.status(site_id, erasure_id)
            if job is None or job.status == DONE or time.monotonic() > deadline:
                return job
            await asyncio.sleep(poll_s)

    # -- the access request --------------------------------------------------------------------------------

    async def export(self, site_id: str, email: str = "", lead_id: str = "") -> dict[str, Any]:
        """Everything stored on the person, as one JSON-ready document."""
        person = await self.find(site_id, email, lead_id)
        redis, keys = self.redis, self.keys
        doc: dict[str, Any] = {"site_id": site_id, "email": person.email, "leads": sorted(person.leads),
                               "visitors": sorted(person.visitors), "exported_ms": int(time.time() * 1000)}
        doc["clickhouse"] = await asyncio.to_thread(self._export_clickhouse, person)

        async def blobs(names: list[str]) -> dict[str, Any]:
            values = await redis.mget(names) if names else []
            return {name: orjson.loads(v) for name, v in zip(names, values) if v is not None}

        lead_names = {keys.lead_state(site_id, lead): lead for lead in person.leads}
        doc["lead_state"] = {lead_names[k]: v for k, v in (await blobs(list(lead_names))).items()}
        record_names = {keys.identity_lead(site_id, lead): lead for lead in person.leads}
        doc["identity"] = {record_names[k]: v for k, v in (await blobs(list(record_names))).items()}
        card_names = {keys.card_state(site_id, card): card for card in person.cards}
        doc["cards"] = {card_names[k]: v for k, v in (await blobs(list(card_names))).items()}
        views: dict[str, dict] = {}
        for stored in await self.definitions.list_boards(site_id):
            found = await redis.hmget(keys.board_cards(site_id, stored.board.id), sorted(person.cards)) if person.cards else []
            for card, value in zip(sorted(person.cards), found):
                if value is not None:
                    views.setdefault(stored.board.id, {})[card] = orjson.loads(value)
        doc["board_views"] = views
        queued = await redis.hmget(keys.webhook_requests, sorted(person.webhooks)) if person.webhooks else []
        doc["queued_webhooks"] = [orjson.loads(v) for v in queued if v is not None]
        return doc

    def _export_clickhouse(self, person: Person) -> dict[str, list[dict]]:
        client = clickhouse.connect(self.clickhouse_config)
        out: dict[str, list[dict]] = {}
        try:
            for table in TABLES:
                found = condition(table, person)
                if found is None:
                    out[table] = []
                    continue
                where, params = found
                rows, columns = client.execute(f"SELECT * FROM {table} WHERE {where} LIMIT 100000", params,
                                               with_column_types=True)
                names = [name for name, _ in columns]
                out[table] = [{n: _plain(v) for n, v in zip(names, row)} for row in rows]
            return out
        finally:
            client.disconnect()


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
