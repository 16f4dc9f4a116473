"""Two pipelines (two topic prefixes) writing into one ClickHouse database: the sinks' raw-offset
watermarks are scoped to the full name of each pipeline's events.raw, so neither skips the other's rows.
Before they were, the second pipeline's rows, at raw offsets the first had already stored, were dropped."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from leadstream.runner import Role, count, produce, wait_for
from leadstream.topics import FAUST_ASSIGNOR_TOPIC, delete_topics, ensure_topics
from processors.runtime.ingest import Message
from schemas.settings import BatchConfig
from sinks.table_sink import TABLES, TableSink
from tests.integration.test_ingest import INVALID, valid_events
from tests.test_lead_processor import event as enriched_event

pytestmark = pytest.mark.integration

BY_RAW_TOPIC = "SELECT count() FROM events WHERE raw_topic = %(topic)s"
LETTERS_BY_TOPIC = "SELECT count() FROM dlq WHERE topic = %(topic)s"


@pytest.fixture
def second_prefix(settings):
    """A second pipeline on the same ClickHouse database (its Redis keys fall under the first's prefix,
    which the `settings` fixture cleans up)."""
    other = replace(settings, topic_prefix=f"{settings.topic_prefix}b.")
    asyncio.run(ensure_topics(other.kafka(), verbose=False))
    yield other
    asyncio.run(delete_topics(other.kafka()))


def _pipeline(settings) -> list[Role]:
    return [Role(settings, "worker", "worker", "--processors", "raw").start(),
            Role(settings, "sink", "sink", "--tables", "events,dlq").start()]


def test_two_prefixes_on_one_database_both_complete_exactly(settings, second_prefix, roles):
    first, second = settings, second_prefix
    roles += _pipeline(first) + _pipeline(second)
    bad = [(b"v0", value) for value, _ in INVALID[:3]]
    n_first, n_second = 800, 500
    # the first pipeline's rows are stored before the second's arrive at the same raw offsets
    asyncio.run(produce(first, valid_events(n_first) + bad))
    wait_for(first, BY_RAW_TOPIC, n_first, 180, roles, params={"topic": first.topic("events.raw")})
    wait_for(first, LETTERS_BY_TOPIC, 3, 60, roles, params={"topic": first.topic("events.raw")})
    asyncio.run(produce(second, valid_events(n_second, site="it2") + bad[:2]))
    wait_for(second, BY_RAW_TOPIC, n_second, 180, roles, params={"topic": second.topic("events.raw")})
    wait_for(second, LETTERS_BY_TOPIC, 2, 60, roles, params={"topic": second.topic("events.raw")})

    for pipeline, events, letters in ((first, n_first, 3), (second, n_second, 2)):
        topic = {"topic": pipeline.topic("events.raw")}
        assert count(pipeline, BY_RAW_TOPIC, topic) == events
        assert count(pipeline, "SELECT uniqExact(event_id) FROM events WHERE raw_topic = %(topic)s", topic) == events
        assert count(pipeline, LETTERS_BY_TOPIC, topic) == letters
    assert count(first, "SELECT count() FROM events") == n_first + n_second


async def test_a_skipped_row_is_counted_and_logged_when_it_happens(settings, second_prefix, caplog):
    def sink(pipeline) -> TableSink:
        return TableSink(TABLES["events"], pipeline.kafka(), pipeline.clickhouse(), BatchConfig())

    def batch(offsets) -> list[Message]:
        return [Message(0, i, None, enriched_event(i)[0]) for i in offsets]

    first, second = sink(settings), sink(second_prefix)
    await first.insert(batch(range(10)))
    await second.insert(batch(range(5)))  # the same raw offsets, another events.raw: all new
    assert (second.rows_written, second.rows_skipped) == (5, 0)

    with caplog.at_level(logging.WARNING, logger="sinks.table_sink"):
        await first.insert(batch(range(5, 12)))  # 5..9 again (a redelivery), then 10 and 11
    assert (first.rows_written, first.rows_skipped) == (12, 5)
    [skip] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert f"skipped 5 rows of {settings.topic('events.raw')}[0], offsets 5..9: at or below offset 9" in skip
    assert count(settings, "SELECT count() FROM events") == 17


async def _topics(settings) -> set[str]:
    admin = AIOKafkaAdminClient(**settings.kafka().client_options())
    await admin.start()
    try:
        return {topic for topic in await admin.list_topics() if topic.startswith(settings.topic_prefix)}
    finally:
        await admin.close()


def _until(condition, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_dropping_a_namespace_leaves_none_of_its_topics_behind(settings, roles):
    """Faust creates its partition assignor's topic itself; a namespace's cleanup removes it with the rest
    (before, every benchmark and test run left one behind in the broker)."""
    roles.append(Role(settings, "worker", "worker", "--processors", "raw").start())
    assert _until(lambda: settings.topic(FAUST_ASSIGNOR_TOPIC) in asyncio.run(_topics(settings)))
    roles[0].stop()
    asyncio.run(delete_topics(settings.kafka()))
    assert _until(lambda: not asyncio.run(_topics(settings))), asyncio.run(_topics(settings))
