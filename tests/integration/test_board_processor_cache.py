"""The runtime keeps the large card states the board processor last wrote, decoded (processors/runtime/decoded.py).
On real Redis: two board processors, as two workers would, take turns on one account card with hundreds of
leads; each remembers what it wrote, yet every batch starts from what Redis holds. The card and its stage
changes come out byte for byte as from one processor doing it all — which itself reused its decoded card."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from leadstream.runner import forget_redis_keys
from processors.board_processor import BoardProcessor
from processors.board_store import BoardStore
from processors.rules import RuleSet
from processors.runtime.ingest import Message
from processors.runtime.producer import MemoryProducer
from processors.runtime.runner import ProcessorRunner
from processors.runtime.state import RedisStateStore
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from schemas.boards import CardUpdate
from schemas.redis_keys import RedisKeys
from schemas.topics import BOARD_COMMANDS, BOARD_STAGE_CHANGES, EVENTS_DLQ, partition_for_key
from tests.test_boards import PIPELINE
from tests.test_lead_processor import NoDefinitionsStore
from tests.twins import sent

pytestmark = pytest.mark.integration

SITE, CARD, PARTITIONS = "s", "account:acme.com", 4


def batches(count: int = 8, size: int = 150) -> list[list[Message]]:
    """Facts of 400 leads of one account: tags come and go, scores rise and fall."""
    rng, partition = random.Random(5), partition_for_key(CARD.encode(), PARTITIONS)
    out, offset = [], 0
    for _ in range(count):
        batch = []
        for _ in range(size):
            tags = rng.sample(["Consideration", "Decision", "Other", "Newsletter"], rng.randint(0, 2))
            update = CardUpdate(f"cu{offset}", SITE, CARD, "facts", "system", lead_id=f"lead_{rng.randrange(400):04d}",
                                tags=tags, score=rng.randint(0, 95), activity_ms=offset, ts_ms=offset)
            batch.append(Message(partition, offset, CARD.encode(), update.to_json(), BOARD_COMMANDS.headers(CardUpdate)))
            offset += 1
        out.append(batch)
    return out


async def run(redis_url: str, prefix: str, processors: int) -> tuple[bytes, list[bytes], list[ProcessorRunner]]:
    redis = aioredis.from_url(redis_url)
    try:
        runners, producer = [], MemoryProducer(EVENTS_DLQ)
        for _ in range(processors):
            sites = SiteDefinitionsCache(NoDefinitionsStore())  # type: ignore[arg-type]
            sites.sites[SITE] = SiteSetup(1, RuleSet.compile([]), (PIPELINE,))
            board = BoardProcessor(BoardStore(redis, prefix), sites, prefix)
            runners.append(ProcessorRunner(board, RedisStateStore(redis, prefix, "board"), producer, PARTITIONS,
                                           EVENTS_DLQ))
        for i, batch in enumerate(batches()):
            await runners[i % processors].process(batch)
        card = await redis.get(RedisKeys(prefix).card_state(SITE, CARD))
        return card, sent(producer, BOARD_STAGE_CHANGES), runners
    finally:
        await redis.aclose()


def test_two_processors_taking_turns_give_what_one_processor_gives(stack_settings):
    namespace = replace(stack_settings, topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
    try:
        alone, alone_changes, (runner,) = asyncio.run(run(namespace.redis_url, f"{namespace.topic_prefix}one", 1))
        turns, turns_changes, (first, second) = asyncio.run(run(namespace.redis_url, f"{namespace.topic_prefix}two", 2))
    finally:
        forget_redis_keys(namespace)
    assert len(alone) > 8_000 and alone_changes  # a card worth keeping decoded, and it moved
    assert (turns, turns_changes) == (alone, alone_changes)
    cards = runner.processor.cards.name  # the kind of state the runtime keeps decoded for the board processor
    assert runner.decoded[cards].hits == 7  # one processor: every batch after the first reused its own write
    assert first.decoded[cards].hits == second.decoded[cards].hits == 0  # taking turns: the other one wrote last
