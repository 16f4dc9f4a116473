"""The segment backfill job: after a segment is created, edited or deleted, or a board gets an `import`,
every lead of the site is brought up to date — history for the counts the edit added, a full evaluation,
and the import step for boards.

Who asks: the definitions store, in the transaction that stores the edit (processors/definitions_store.py),
whoever made it (the CLI, the API). It leaves `backfill:wanted` (site -> the version to reach) and
`backfill:since` (the site's segments before the first edit not yet backfilled) in Redis. Who runs it: the
workers that run the lead processor: every second `SegmentBackfillJob` looks for wanted backfills and runs
them one at a time under a store lock, so several workers run each once. It reads ClickHouse through the
query function it is given (the operator layer hands it one made with sinks/clickhouse.py: processors never
import the sinks).

One run for a site, at its current definitions version V:
  1. a `DefinitionsMark` of V on every partition of `leads.activity`; wait until the lead processor has
     passed them all. Every event after a mark is counted by V's counters as it arrives;
  2. wait until the events and leads sinks have stored everything on their topics up to then: every event
     the lead processor handled before the marks is in ClickHouse;
  3. for each counter V has and the segments before did not keep enough of, one history query
     (processors/segment_history.py): each lead's newest matching events in the window;
  4. the site's current leads (`leads FINAL WHERE merged_into = ''`), and one `SegmentBackfill` per lead
     (with its history, or none) on `leads.activity`, keyed by lead. The lead processor merges the entries
     (an event it also counted live counts once: same digest), evaluates the lead in full (cause
     `definitions:V`), tells its cards its facts (a board created after its members exist gets their cards:
     actor `import`) and its account its filters (the account processor tells account cards theirs);
  5. done: the request is removed, or, if another edit came meanwhile, kept from V on; the outcome is in
     `backfill:done` (version, leads, history rows, seconds).
A run that fails (a server away, no lead processor passing the marks in time) leaves the request; the next
tick runs it again. Running it twice is harmless: a backfill record is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.exceptions import WatchError

from processors.definitions_store import DefinitionsStore, segments_at
from processors.runtime.ingest import consumer as kafka_consumer
from processors.runtime.producer import BatchProducer, Outputs
from processors.runtime.state import RedisStateStore
from processors.segment_history import backfill_records, history_queries
from processors.segments import SegmentSet
from schemas.records import digest
from schemas.redis_keys import BACKFILL_LOCK, RedisKeys
from schemas.segments import DefinitionsMark, SegmentBackfill
from schemas.settings import KafkaConfig
from schemas.topics import EVENTS_ENRICHED, IDENTITY_LEADS, LEADS_ACTIVITY, Topic, sink_group

log = logging.getLogger(__name__)

POLL_S = 1.0
LOCK_LEASE_MS = 15 * 60_000  # longer than any run: a run that dies leaves the lock for this long
WAIT_S = 300  # for the lead processor to pass the marks, for the sinks to catch up
RECORDS_PER_SEND = 10_000
LEADS_SQL = "SELECT lead_id FROM leads FINAL WHERE site_id = %(site_id)s AND merged_into = ''"

Query = Callable[[str, dict[str, Any]], list[tuple]]
"""Runs one ClickHouse query (constant SQL, values as parameters) and returns its rows; called in a thread."""


@dataclass(frozen=True, slots=True)
class BackfillDone:
    """What a finished backfill of a site did (kept in `backfill:done` for operators and the API)."""

    version: int
    leads: int
    history_rows: int
    seconds: float
    finished_ms: int


async def backfill_status(redis: aioredis.Redis, prefix: str, site: str) -> tuple[int | None, BackfillDone | None]:
    """(the version a pending backfill must reach, or None; the last finished backfill, or None)."""
    keys = RedisKeys(prefix)
    wanted, done = await redis.hget(keys.backfill_wanted, site), await redis.hget(keys.backfill_done, site)
    return (int(wanted) if wanted is not None else None,
            BackfillDone(**orjson.loads(done)) if done is not None else None)


class SegmentBackfillJob:
    """Runs the wanted backfills (see module docstring) until `stop`, with the worker's Redis and producer."""

    def __init__(self, kafka: KafkaConfig, redis: aioredis.Redis, producer: BatchProducer, prefix: str,
                 query: Query):
        self.kafka = kafka
        self.redis = redis
        self.producer = producer
        self.prefix = prefix
        self.keys = RedisKeys(prefix)
        self.query = query

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _sleep(stop, POLL_S)
            try:
                for site in sorted(s.decode() for s in await self.redis.hkeys(self.keys.backfill_wanted)):
                    await self._locked(site)
            except Exception:  # noqa: BLE001 - the request stays; a later tick runs it again
                log.exception("segment backfill failed; it runs again")
                await _sleep(stop, 10 * POLL_S)

    async def _locked(self, site: str) -> None:
        store = RedisStateStore(self.redis, self.prefix, "lead")
        fence = await store.acquire(BACKFILL_LOCK, LOCK_LEASE_MS)
        if fence is None:
            return  # another worker is running one
        try:
            await self.backfill(site)
        finally:
            await store.release(fence)

    async def backfill(self, site: str) -> BackfillDone | None:
        """One run for `site` (None: nothing was wanted)."""
        redis = self.redis
        since = await redis.hget(self.keys.backfill_since, site)
        if since is None:
            return None
        started = time.monotonic()
        definitions = await DefinitionsStore(redis, self.prefix).load(site)
        version = definitions.version
        before_version, before = segments_at(since)
        current = SegmentSet.compile(definitions.segments, version)
        log.info("segment backfill of %s: definitions %d -> %d", site, before_version, version)
        await self._mark(site, version)
        await self._sinks_caught_up((EVENTS_ENRICHED, "events"), (IDENTITY_LEADS, "leads"))
        as_of_ms = int(time.time() * 1000)
        rows, leads = await asyncio.to_thread(self._read, current, SegmentSet.compile(before, before_version), site,
                                              as_of_ms)
        records = backfill_records(current, site, as_of_ms, leads, rows)
        for start in range(0, len(records), RECORDS_PER_SEND):
            await self.producer.send(_outputs(records[start:start + RECORDS_PER_SEND], self.kafka.partitions))
        done = BackfillDone(version, len(records), sum(map(len, rows.values())),
                            round(time.monotonic() - started, 3), int(time.time() * 1000))
        await self._finish(site, definitions.segments_snapshot(), done)
        log.info("segment backfill of %s at version %d: %d leads, %d history rows, %.1f s", site, version,
                 done.leads, done.history_rows, done.seconds)
        return done

    async def _mark(self, site: str, version: int) -> None:
        """A mark on every partition of leads.activity, then wait until the lead processor passed them."""
        outputs = Outputs(self.kafka.partitions)
        mark = DefinitionsMark("dm_" + digest(site, str(version)), site, version).to_json()
        for partition in range(self.kafka.partitions):
            outputs.records[(LEADS_ACTIVITY.name, partition)].append(
                (None, mark, LEADS_ACTIVITY.headers(DefinitionsMark)))
        await self.producer.send(outputs)
        ends = await self._end_offsets(LEADS_ACTIVITY)
        watermarks = self.keys.watermarks("lead")

        async def passed() -> bool:
            marks = await self.redis.hgetall(watermarks)
            return all(int(marks.get(str(tp.partition).encode(), -1)) >= end - 1 for tp, end in ends.items())

        await _until(passed, f"the lead processor to pass the definitions marks of {site} (is a worker with the "
                             "lead processor running?)")

    async def _sinks_caught_up(self, *sinks: tuple[Topic, str]) -> None:
        """Until each table's sink has committed everything its topic holds now."""
        admin = AIOKafkaAdminClient(**self.kafka.client_options())
        await admin.start()
        try:
            for topic, table in sinks:
                ends = await self._end_offsets(topic)

                async def stored() -> bool:
                    committed = await admin.list_consumer_group_offsets(self.kafka.group(sink_group(table)))
                    return all(end == 0 or (tp in committed and committed[tp].offset >= end) for tp, end in ends.items())

                await _until(stored, f"the {table} sink to store {topic.name} (is `leadstream sink` running?)")
        finally:
            await admin.close()

    async def _end_offsets(self, topic: Topic) -> dict[TopicPartition, int]:
        consumer = kafka_consumer(self.kafka, group=None)
        await consumer.start()
        try:
            return await consumer.end_offsets(
                [TopicPartition(self.kafka.topic(topic.name), p) for p in range(self.kafka.partitions)])
        finally:
            await consumer.stop()

    def _read(self, current: SegmentSet, before: SegmentSet, site: str, as_of_ms: int
              ) -> tuple[dict[str, list[tuple[str, int, str]]], list[str]]:
        """(history rows per counter, the site's current leads), from ClickHouse."""
        rows = {key: self.query(sql, params)
                for key, (sql, params) in history_queries(current, before, site, as_of_ms).items()}
        return rows, [lead_id for (lead_id,) in self.query(LEADS_SQL, {"site_id": site})]

    async def _finish(self, site: str, snapshot: bytes, done: BackfillDone) -> None:
        """The request is done up to `done.version`: removed, or (another edit came meanwhile) kept from there."""
        keys = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(keys.backfill_wanted)
                    wanted = int(await pipe.hget(keys.backfill_wanted, site) or 0)
                    pipe.multi()
                    if wanted <= done.version:
                        pipe.hdel(keys.backfill_wanted, site)
                        pipe.hdel(keys.backfill_since, site)
                    else:
                        pipe.hset(keys.backfill_since, site, snapshot)
                    pipe.hset(keys.backfill_done, site, orjson.dumps(done))
                    await pipe.execute()
                    return
                except WatchError:
                    continue


def _outputs(records: Iterable[SegmentBackfill], partitions: int) -> Outputs:
    outputs = Outputs(partitions)
    for record in records:
        outputs.add(LEADS_ACTIVITY, record.lead_id.encode(), record.to_json(), record_type=SegmentBackfill)
    return outputs


async def _until(check, what: str) -> None:
    """Poll `check` until it holds; after WAIT_S, raise (the request stays and is tried again)."""
    deadline, next_log = time.monotonic() + WAIT_S, time.monotonic() + 30
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"segment backfill: waited {WAIT_S} s for {what}")
        if time.monotonic() > next_log:
            log.warning("segment backfill: waiting for %s", what)
            next_log = time.monotonic() + 30
        await asyncio.sleep(0.2)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
