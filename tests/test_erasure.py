"""Erasure's pure half and the processors' drop decision, without servers: the ledger (schemas/erasure.py),
the runtime's guard (a batch precondition) and the raw, lead and board processors on the in-memory twin."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.runtime.runner import StaleBatch
from processors.runtime.state import MemoryStateStore, PartitionCommit
from processors.runtime.writes import MemoryRedis, WriteBatch
from schemas.erasure import (EMAIL, LEAD, VISITOR, ErasureJob, Ledger, audit_row, email_digest, ledger_field,
                             ledger_fields, queue_ledger_entries)
from schemas.redis_keys import RedisKeys
from schemas.topics import EVENTS_DLQ, EVENTS_ENRICHED, LEADS_ACTIVITY, SESSIONS
from tests.test_raw_processor import event, messages, runner
from tests.twins import count, values

KEY = b"k" * 32
ids = st.text(alphabet="abcdefghij-0123456789", min_size=1, max_size=8)
emails = st.builds(lambda a, b: f"{a}@{b}.io", ids, ids)


@given(site=ids, visitors=st.sets(ids, max_size=4), leads=st.sets(ids, max_size=4), erased_emails=st.sets(emails, max_size=3),
       probe_visitor=ids, probe_lead=ids, probe_email=emails)
def test_the_ledger_drops_exactly_what_was_erased(site, visitors, leads, erased_emails, probe_visitor, probe_lead,
                                                   probe_email):
    digests = {email_digest(KEY, site, e) for e in erased_emails}
    ledger = Ledger.of(ledger_fields(site, visitors, leads, digests), KEY)
    assert ledger.drops(site, probe_visitor) == (probe_visitor in visitors)
    assert ledger.drops(site, lead_id=probe_lead) == (probe_lead in leads)
    assert ledger.drops(site, email=probe_email) == (probe_email in erased_emails)
    assert ledger.drops(site, email=f"  {probe_email.upper()} ") == (probe_email in erased_emails)  # normalised
    other = site + "x"  # nothing of one site is erased on another
    assert not ledger.drops(other, probe_visitor, probe_lead, probe_email)


@given(site=ids, email=emails)
def test_an_email_is_kept_only_as_a_keyed_digest(site, email):
    fields = ledger_fields(site, email_digests=[email_digest(KEY, site, email)])
    assert all(email not in f for f in fields)
    assert email_digest(KEY, site, email) != email_digest(b"another key" * 3, site, email)


def test_ledger_fields_are_validated_and_unknown_ones_ignored():
    with pytest.raises(ValueError):
        ledger_field("x", "s", "v")
    ledger = Ledger.of([b"v\x1fs\x1fv1", "garbage", "l\x1fs", ledger_field(LEAD, "s", "lead_1")])
    assert ledger.visitors == {("s", "v1")} and ledger.leads == {("s", "lead_1")} and not ledger.emails
    assert not Ledger.of([]) and Ledger.of([ledger_field(EMAIL, "s", "d")])


def test_the_audit_row_carries_no_personal_data():
    job = ErasureJob("er_1", "s", "key_ab", 1, counts={"events": 3, "redis:visitors": 2})
    row = audit_row(job, 7)
    assert row == ("er_1", "s", "key_ab", 1, 0, "pending", ["events", "redis:visitors"], [3, 2], 7)
    assert set(job.public()) == {"id", "site_id", "status", "requested_by", "requested_ms", "finished_ms", "counts"}


# -- the runtime's guard ----------------------------------------------------------------------------------

async def test_a_commit_guarded_by_a_key_writes_nothing_once_the_key_changed():
    store = MemoryStateStore()
    writes = WriteBatch()
    writes.set_many({"ls:x": b"1"})
    guard = {"ls:erasure:version": None}
    store.redis.increment("ls:erasure:version")  # an erasure after the batch read the version
    assert not await store.commit([PartitionCommit(0, -1, 5)], writes, guards=guard)
    assert store.redis.get("ls:x") is None and (await store.partition_marks([0]))[0][0] == -1
    assert await store.commit([PartitionCommit(0, -1, 5)], writes, guards={"ls:erasure:version": b"1"})
    assert store.redis.get("ls:x") == b"1"


# -- the processors drop an erased person's records -------------------------------------------------------

def erase(redis: MemoryRedis, site: str = "s", visitors=(), leads=(), email_list=(), key: bytes = KEY) -> None:
    keys = RedisKeys("ls")
    redis.set_many({keys.erasure_key: key})
    queue_ledger_entries(redis, keys, ledger_fields(site, visitors, leads, [email_digest(key, site, e) for e in email_list]),
                         "er_test")


async def test_the_raw_processor_drops_an_erased_visitor_and_email_and_nothing_else():
    run, store, producer = runner()
    erase(store.redis, visitors=["v-ann"], email_list=["ann@initech.io"])
    batch = messages([event(1, "v-ann"), event(2, "v-bob"),
                      event(3, "v-new", type="form_submit", email=" Ann@Initech.io"),  # a third device of ann
                      event(4, "v-ann", event_id="bad", type="teleport"), b"{broken"])  # a bad one of hers: not even a dead letter
    outputs = await run.process(batch)
    assert count(outputs, EVENTS_ENRICHED) == 1 and count(outputs, EVENTS_DLQ) == 1  # only the broken one
    assert [orjson.loads(v)["visitor_id"] for v in values(outputs, EVENTS_ENRICHED)] == ["v-bob"]
    produced = [v for records in outputs.records.values() for _, v, _ in records]
    assert count(outputs, SESSIONS) == 1 and not [v for v in produced if b"v-ann" in v]
    assert not [v for v in produced if b"v-new" in v or b"nitech" in v]
    assert run.processor.ledger.dropped == 3
    assert (await store.partition_marks([0]))[0][0] == 4  # dropped messages are applied all the same
    assert not [k for k in store.redis.strings if "v-ann" in k or "v-new" in k]


class ErasedDuringTheBatch(MemoryStateStore):
    """An erasure lands between the batch's step and its commit (the worker held the batch meanwhile)."""

    erase_before_commit = True

    async def commit(self, commits, writes=None, fence=None, guards=None) -> bool:
        if self.erase_before_commit:
            self.erase_before_commit = False
            erase(self.redis, visitors=["v-ann"])
        return await super().commit(commits, writes, fence, guards)


async def test_an_erasure_during_a_batch_fails_its_commit_and_the_batch_again_drops_the_person():
    run, store, producer = runner(ErasedDuringTheBatch())
    batch = messages([event(1, "v-ann"), event(2, "v-bob")])
    with pytest.raises(StaleBatch):
        await run.process(batch)
    assert not [k for k in store.redis.strings if "v-ann" in k]  # the stale batch wrote nothing
    outputs = await run.process(batch)  # the ingest hands it over again
    assert count(outputs, EVENTS_ENRICHED) == 1
    assert not [k for k in store.redis.strings if "v-ann" in k] and [k for k in store.redis.strings if "v-bob" in k]


# -- the lead and board processors -----------------------------------------------------------------------

async def test_the_lead_processor_drops_an_erased_leads_records_and_its_hourly_pass():
    from tests.test_lead_processor import event as lead_event
    from tests.test_lead_processor import feed, identity, processor_runner

    run, store, producer = processor_runner()
    erase(store.redis, leads=["lead_a"])
    outputs = await run.process(feed([lead_event(1, "lead_a"), lead_event(2, "lead_b"),
                                      identity("lead_merged", "lead_b", "lead_a")]))  # a merge out of hers
    produced = [v for records in outputs.records.values() for _, v, _ in records]
    assert produced and not [v for v in produced if b"lead_a" in v]
    assert not [k for k in store.redis.strings if "lead_a" in k] and run.processor.ledger.dropped == 2
    assert (await store.partition_marks([0]))[0][0] == 2


async def test_the_board_processor_drops_an_erased_leads_card_updates_and_commands():
    from schemas.boards import BoardCommand
    from tests.test_board_processor import board_runner, facts
    from tests.test_board_processor import feed as board_feed

    run, store, producer = board_runner()
    erase(store.redis, leads=["lead_a"])
    move = BoardCommand("cmd1", "s", "pipeline", "lead:lead_a", "move", "user:key-x", to_stage="new")
    outputs = await run.process(board_feed(facts("u1", "lead:lead_a", "lead_a", ["Hot"]),
                                           facts("u2", "lead:lead_b", "lead_b", ["Hot"]), move))
    assert not [k for k in store.redis.strings if "lead_a" in k] and [k for k in store.redis.strings if "lead_b" in k]
    ledger = RedisKeys("ls").erasure_ledger
    assert not [f for key, h in store.redis.hashes.items() if key != ledger for f, v in h.items()
                if "lead_a" in f or b"lead_a" in v]  # no board view
    assert run.processor.ledger.dropped == 2 and outputs is not None
