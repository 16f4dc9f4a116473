"""The board store on the real Redis: writes queued in the board processor's MULTI transaction, paged columns with
counts, the version (ETag), the live feed (resume, trimmed, wait) and site isolation."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from processors import board_store
from processors.board_store import START, BoardStore
from processors.boards import Cause, CardState, FactsUpdate, ViewChange, apply_command
from processors.runtime.state import PartitionCommit, RedisStateStore
from processors.runtime.writes import RedisWrites, WriteBatch
from schemas.boards import BoardCommand, BoardDefinition, CardView, CommandResult
from tests.test_boards import apply_updates

pytestmark = pytest.mark.integration

PIPELINE = BoardDefinition.model_validate({
    "id": "pipeline", "name": "Sales pipeline", "card": "account", "stages": [
        {"id": "new", "name": "New", "entry": True},
        {"id": "consideration", "name": "Consideration", "when_tag": "Consideration"},
        {"id": "decision", "name": "Decision", "when_tag": "Decision"},
    ]})


@pytest.fixture
async def redis(settings):
    client = aioredis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis, settings) -> BoardStore:
    return BoardStore(redis, settings.name("ls"))


async def commit(store: BoardStore, site: str, changes=(), views=()) -> None:
    async with store.redis.pipeline(transaction=True) as pipe:
        store.queue_changes(RedisWrites(pipe), site, list(changes), list(views))
        await pipe.execute()


def update(tags: list[str], ts_ms: int) -> FactsUpdate:
    return FactsUpdate(Cause("rule:r@1", ts_ms, "r", f"e{ts_ms}"), "l1", tags, 10, activity_ms=ts_ms)


def bulk_views(count: int, stage: str = "new") -> list[ViewChange]:
    return [ViewChange("pipeline", f"account:c{i}.com", CardView(f"account:c{i}.com", stage, title=f"c{i}",
                                                                 entered_stage_ms=1_000 + i)) for i in range(count)]


def stage_of(page, card_id: str) -> list[str]:
    return [column.stage_id for column in page.columns if any(card.card_id == card_id for card in column.cards)]


async def test_moves_committed_with_the_card_state_show_on_the_board(store, settings):
    card, changes, views = apply_updates([PIPELINE], CardState("account:acme.com", "s1"), [update([], 1_000)])
    state_store = RedisStateStore(store.redis, settings.name("ls"), "board")
    key = store.keys.card_state("s1", card.card_id)
    writes = WriteBatch()
    writes.set_many({key: card.to_json()})
    store.queue_changes(writes, "s1", changes, views)
    assert await state_store.commit([PartitionCommit(0, -1, 10, 1_000)], writes)
    stale = WriteBatch()  # a zombie's batch: nothing of it is written
    stale.set_many({key: b"{}"})
    store.queue_changes(stale, "s1", changes, views)
    assert not await state_store.commit([PartitionCommit(0, -1, 11, 1_000)], stale)
    assert (await store.load_cards("s1", [card.card_id, "account:none.com"])) == {
        card.card_id: card, "account:none.com": None}
    page = await store.board("s1", PIPELINE)
    assert page.version == 1 and [c.count for c in page.columns] == [1, 0, 0]
    assert stage_of(page, "account:acme.com") == ["new"]

    card, changes, views = apply_updates([PIPELINE], card, [update(["Decision"], 2_000)])
    await commit(store, "s1", changes, views)
    page = await store.board("s1", PIPELINE)
    assert page.version == 2 and [c.count for c in page.columns] == [0, 0, 1]
    assert page.columns[2].cards[0].entered_stage_ms == 2_000
    assert await store.card("s1", "pipeline", card.card_id) == page.columns[2].cards[0]


async def test_a_card_moving_twice_in_one_batch_ends_in_one_column(store):
    card = CardState("account:acme.com", "s1")
    card, first, views1 = apply_updates([PIPELINE], card, [update([], 1_000)])
    card, second, views2 = apply_updates([PIPELINE], card, [update(["Consideration"], 2_000)])
    card, third, views3 = apply_updates([PIPELINE], card, [update(["Decision"], 3_000)])
    await commit(store, "s1", first + second + third, views1 + views2 + views3)
    page = await store.board("s1", PIPELINE)
    assert [c.count for c in page.columns] == [0, 0, 1] and page.version == 1
    await commit(store, "s1", first + second + third, views1 + views2 + views3)  # a batch written twice
    again = await store.board("s1", PIPELINE)
    assert [c.count for c in again.columns] == [0, 0, 1] and again.version == 2


async def test_a_ten_thousand_card_column_is_paged_with_its_count(store):
    await commit(store, "s1", views=bulk_views(10_000))
    started = time.perf_counter()
    page = await store.board("s1", PIPELINE, limit_per_stage=50)
    assert time.perf_counter() - started < 1.0
    column = page.columns[0]
    assert column.count == 10_000 and len(column.cards) == 50
    assert [c.card_id for c in column.cards[:2]] == ["account:c9999.com", "account:c9998.com"]  # newest first
    second = await store.board("s1", PIPELINE, limit_per_stage=50, offsets={"new": 50})
    assert second.columns[0].cards[0].card_id == "account:c9949.com" and second.columns[0].offset == 50
    last = await store.board("s1", PIPELINE, limit_per_stage=100_000, offsets={"new": 9_990})
    assert len(last.columns[0].cards) == 10
    assert [len(c.cards) for c in (await store.board("s1", PIPELINE, limit_per_stage=0)).columns] == [0, 0, 0]


async def test_feed_resumes_after_an_id_and_reports_when_it_was_trimmed(store, monkeypatch):
    await commit(store, "s1", views=bulk_views(3))
    everything = await store.feed_after("s1", "pipeline", START)
    assert not everything.trimmed and [e.type for e in everything.entries] == ["card"] * 3
    rest = await store.feed_after("s1", "pipeline", everything.entries[0].id)
    assert rest.entries == everything.entries[1:]
    assert (await store.feed_after("s1", "pipeline", everything.entries[-1].id)).entries == []
    future = f"{int(time.time() * 1000) + 86_400_000}-0"
    assert (await store.feed_after("s1", "pipeline", future)).trimmed  # an id this feed never issued

    monkeypatch.setattr(board_store, "FEED_MAXLEN", 10)
    await commit(store, "s1", views=bulk_views(1_000, "consideration"))
    trimmed = await store.feed_after("s1", "pipeline", everything.entries[0].id)
    assert trimmed.trimmed and trimmed.entries == []
    page = await store.board("s1", PIPELINE)
    latest = await store.feed_after("s1", "pipeline", page.feed_id)
    assert not latest.trimmed and latest.entries == []
    with pytest.raises(ValueError):
        await store.feed_after("s1", "pipeline", "not-an-id")


async def test_wait_feed_wakes_on_a_new_entry(store):
    page = await store.board("s1", PIPELINE)
    assert page.feed_id == START
    assert (await store.wait_feed("s1", "pipeline", page.feed_id, block_ms=50)).entries == []
    waiting = asyncio.create_task(store.wait_feed("s1", "pipeline", page.feed_id, block_ms=10_000))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    card, changes, views = apply_updates([PIPELINE], CardState("account:acme.com", "s1"), [update([], 1_000)])
    started = time.perf_counter()
    await commit(store, "s1", changes, views)  # on another pooled connection than the blocked XREAD
    woke = await asyncio.wait_for(waiting, 5)
    assert time.perf_counter() - started < 1.0
    assert [e.type for e in woke.entries] == ["stage_change", "card"] and not woke.trimmed
    assert b'"to_stage":"new"' in woke.entries[0].data


async def test_command_results_are_kept_once_and_expire(store):
    card = CardState("account:acme.com", "s1")
    command = BoardCommand("cmd-1", "s1", "pipeline", card.card_id, "add", "user:ann")
    card, result, changes, views = apply_command([PIPELINE], card, command, 1_000)
    async with store.redis.pipeline(transaction=True) as pipe:
        writes = RedisWrites(pipe)
        store.queue_changes(writes, "s1", changes, views)
        store.queue_command_result(writes, result)
        store.queue_command_result(writes, CommandResult("cmd-1", "s1", "pipeline", card.card_id, False, "late"))
        await pipe.execute()
    assert await store.command_result("s1", "cmd-1") == result
    ttl = await store.redis.ttl(store.keys.command_result("s1", "cmd-1"))
    assert 0 < ttl <= board_store.COMMAND_RESULT_TTL_S


async def test_notes_are_stored_with_the_card_and_removed_with_it(store):
    card, changes, views = apply_updates([PIPELINE], CardState("account:acme.com", "s1"), [update([], 1_000)])
    card, _, _, note_views = apply_command(
        [PIPELINE], card, BoardCommand("n1", "s1", "pipeline", card.card_id, "note", "user:ann", text="call"), 2_000)
    await commit(store, "s1", changes, views + note_views)
    assert [n.text for n in await store.card_notes("s1", "pipeline", card.card_id)] == ["call"]
    await commit(store, "s1", views=[ViewChange("pipeline", card.card_id, None, "new")])
    assert await store.card("s1", "pipeline", card.card_id) is None
    assert await store.card_notes("s1", "pipeline", card.card_id) == []
    page = await store.board("s1", PIPELINE)
    assert [c.count for c in page.columns] == [0, 0, 0]
    assert (await store.feed_after("s1", "pipeline", START)).entries[-1].type == "card_removed"


async def test_sites_never_see_each_others_boards(store):
    await commit(store, "s1", views=bulk_views(5))
    async with store.redis.pipeline(transaction=True) as pipe:
        store.queue_command_result(RedisWrites(pipe), CommandResult("cmd-1", "s1", "pipeline", "account:c1.com", True))
        await pipe.execute()
    page = await store.board("s2", PIPELINE)
    assert (page.version, [c.count for c in page.columns], page.feed_id) == (0, [0, 0, 0], START)
    assert await store.card("s2", "pipeline", "account:c1.com") is None
    assert await store.command_result("s2", "cmd-1") is None
    assert (await store.feed_after("s2", "pipeline", START)).entries == []
    assert await store.version("s1", "pipeline") == 1


async def test_clearing_a_board_keeps_its_version_growing_and_resets_the_feed(store):
    await commit(store, "s1", views=bulk_views(5))
    before = await store.feed_after("s1", "pipeline", START)
    await commit(store, "s1", views=[ViewChange("pipeline", "account:c1.com", CardView("account:c1.com", "decision"),
                                                "new")])
    await store.clear_board("s1", "pipeline")
    page = await store.board("s1", PIPELINE)
    assert page.version == 3 and [c.count for c in page.columns] == [0, 0, 0]
    resumed = await store.feed_after("s1", "pipeline", before.entries[-1].id)
    assert [e.type for e in resumed.entries] == ["reset"]
    keys = [key async for key in store.redis.scan_iter(match=f"{store.keys.prefix}:board:s1*")]
    assert sorted(k.decode().rpartition(":")[2] for k in keys) == ["feed", "version"]
