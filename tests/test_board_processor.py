"""The board processor on the shared runtime without servers: the in-memory state store on the Redis twin,
the memory producer and a clock the test holds. What a batch leaves is read back from the twin the way the
board API reads Redis: the board's columns, card views, live feed and version, and command results."""

from __future__ import annotations

import time

import orjson
import redis.asyncio as aioredis

from processors.board_processor import BoardProcessor
from processors.board_store import BoardStore
from processors.boards import CardState
from processors.rules import RuleSet
from processors.runtime.ingest import Message
from processors.runtime.producer import MemoryProducer
from processors.runtime.runner import ProcessorRunner
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from schemas.boards import BoardCommand, CardUpdate, CardView, CommandResult, StageChange
from schemas.redis_keys import RedisKeys
from schemas.topics import BOARD_COMMANDS, BOARD_STAGE_CHANGES, EVENTS_DLQ, partition_for_key
from tests.test_boards import PIPELINE
from tests.test_lead_processor import NoDefinitionsStore
from tests.twins import Clock, RecordingStore, applied, records, states, values

NOW = int(time.time() * 1000)
SITE = "s"
KEYS = RedisKeys("ls")


def board_runner(store: RecordingStore | None = None) -> tuple[ProcessorRunner, RecordingStore, MemoryProducer]:
    sites = SiteDefinitionsCache(NoDefinitionsStore())  # type: ignore[arg-type]
    sites.sites[SITE] = SiteSetup(1, RuleSet.compile([]), (PIPELINE,))
    store = store or RecordingStore(processor="board")
    producer = MemoryProducer(EVENTS_DLQ)
    board = BoardProcessor(BoardStore(aioredis.Redis(), "ls"), sites, "ls")  # never connects: writes go to the batch
    return ProcessorRunner(board, store, producer, 4, EVENTS_DLQ, clock_us=Clock(NOW)), store, producer


def facts(update_id: str, card_id: str, lead_id: str, tags: list[str], score: int = 10, ts_ms: int = NOW) -> CardUpdate:
    return CardUpdate(update_id, SITE, card_id, "facts", "rule:r@1", lead_id=lead_id, tags=tags, score=score,
                      title=card_id.partition(":")[2], activity_ms=ts_ms, rule_id="r", event_id=f"e-{update_id}",
                      ts_ms=ts_ms)


def feed(*records: CardUpdate | BoardCommand, first_offset: int = 0) -> list[Message]:
    """The records as the board processor reads them from board.commands: on their card's partition, typed."""
    return [Message(partition_for_key(r.card_id.encode(), 4), first_offset + i, r.card_id.encode(), r.to_json(),
                    BOARD_COMMANDS.headers(type(r))) for i, r in enumerate(records)]


def column(store: RecordingStore, stage: str) -> list[str]:
    return list(store.redis.zset(KEYS.board_column(SITE, "pipeline", stage)))


def views(store: RecordingStore) -> dict[str, CardView]:
    return {card_id: CardView.from_json(view) for card_id, view in store.redis.hash(KEYS.board_cards(SITE, "pipeline")).items()}


def version(store: RecordingStore) -> int:
    return int(store.redis.get(KEYS.board_version(SITE, "pipeline")) or 0)


def feed_entries(store: RecordingStore) -> list[tuple[str, dict]]:
    return [(fields["type"].decode(), orjson.loads(fields["data"]))
            for _, fields in store.redis.stream(KEYS.board_feed(SITE, "pipeline"))]


async def test_a_card_enters_and_moves_with_its_column_view_feed_and_version():
    run, store, producer = board_runner()
    first = await run.process(feed(facts("u1", "account:acme.com", "l1", [])))
    assert [StageChange.from_json(v).to_stage for v in values(first, BOARD_STAGE_CHANGES)] == ["new"]
    assert column(store, "new") == ["account:acme.com"] and version(store) == 1

    moved = await run.process(feed(facts("u2", "account:acme.com", "l1", ["Decision"], ts_ms=NOW + 1),
                                   first_offset=1))
    [change] = [StageChange.from_json(v) for v in values(moved, BOARD_STAGE_CHANGES)]
    assert (change.from_stage, change.to_stage, change.seq, change.actor) == ("new", "decision", 2, "rule:r@1")
    assert column(store, "new") == [] and column(store, "decision") == ["account:acme.com"]
    view = views(store)["account:acme.com"]
    assert (view.stage_id, view.tags, view.entered_stage_ms, view.lead_ids) == ("decision", ["Decision"], NOW + 1, ["l1"])
    assert [kind for kind, _ in feed_entries(store)] == ["stage_change", "card", "stage_change", "card"]
    assert feed_entries(store)[2][1]["to_stage"] == "decision"
    assert version(store) == 2  # one bump per committed batch that changed the board
    card = CardState.from_json(store.redis.get(KEYS.card_state(SITE, "account:acme.com")))
    assert card.stage_on("pipeline") == "decision" and card.command_ids == ["u1", "u2"]


async def test_a_replayed_batch_or_a_resent_update_changes_the_board_once():
    run, store, producer = board_runner()
    batch = feed(facts("u1", "account:acme.com", "l1", ["Consideration"]))
    await run.process(batch)
    before, board_version = states(store), version(store)
    assert await run.process(batch) is None  # a replay: skipped by the watermark
    resent = await run.process(feed(facts("u1", "account:acme.com", "l1", ["Consideration"]), first_offset=1))
    assert values(resent, BOARD_STAGE_CHANGES) == []  # the same update again (its producer replayed): acted on once
    assert states(store) == before and version(store) == board_version


async def test_a_persons_command_stores_its_first_result_and_an_unchanged_card_is_not_written_again():
    run, store, producer = board_runner()
    await run.process(feed(facts("u1", "account:acme.com", "l1", [])))
    move = BoardCommand("cmd-1", SITE, "pipeline", "account:acme.com", "move", "user:ann", to_stage="decision")
    await run.process(feed(move, first_offset=1))
    result = CommandResult.from_json(store.redis.get(KEYS.command_result(SITE, "cmd-1")))
    assert result.ok and result.stage_change_id and column(store, "decision") == ["account:acme.com"]
    assert 0 < store.redis.ttl_ms(KEYS.command_result(SITE, "cmd-1")) <= 86_400_000
    card_key = KEYS.card_state(SITE, "account:acme.com")
    assert card_key in store.written_keys()

    again = await run.process(feed(move, first_offset=2))  # the API re-sent it: a no-op on the card
    assert values(again, BOARD_STAGE_CHANGES) == [] and card_key not in store.written_keys()
    assert CommandResult.from_json(store.redis.get(KEYS.command_result(SITE, "cmd-1"))) == result  # first one stays
    assert await applied(store, partition_for_key(b"account:acme.com", 4)) == 2


async def test_a_merged_lead_card_hands_its_state_over_to_its_account_card():
    run, store, producer = board_runner()
    await run.process(feed(facts("u1", "lead:l1", "l1", ["Consideration"])))
    merge = CardUpdate("u2", SITE, "lead:l1", "merge", "system", into_card_id="account:acme.com", ts_ms=NOW + 5)
    merged = await run.process(feed(merge, first_offset=1))
    [handover] = records(merged, BOARD_COMMANDS)  # typed by its header: a card update for the survivor
    assert isinstance(handover, CardUpdate) and (handover.kind, handover.card_id) == ("handover", "account:acme.com")
    await run.process(feed(handover, first_offset=2))
    assert "lead:l1" not in views(store)
    assert CardState.from_json(store.redis.get(KEYS.card_state(SITE, "account:acme.com"))).stage_on("pipeline") \
        == "consideration"  # the survivor took the retired card's place


async def test_a_large_card_the_processor_wrote_is_not_decoded_again():
    run, store, producer = board_runner()
    key = KEYS.card_state(SITE, "account:acme.com")
    for batch in range(3):
        await run.process(feed(*(facts(f"u{batch}-{i}", "account:acme.com", f"lead_{i:04d}", ["Other"])
                                 for i in range(200)), first_offset=batch * 200))
    assert len(store.redis.get(key)) > 4096
    assert run.decoded[run.processor.cards.name].hits == 2  # the second and third batch reused the first's write
