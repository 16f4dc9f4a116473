"""Fixtures for tests on the real local stack (Kafka, ClickHouse, Redis started by `leadstream stack up`).

Every test gets its own namespace: topic prefix, consumer groups, Redis key prefix and ClickHouse
database, so tests never see each other's data. Nothing here skips: if the stack cannot start, the
tests error.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import replace

import pytest

from leadstream import stack
from leadstream.runner import Role, drop_namespace
from leadstream.topics import ensure_topics
from schemas.settings import Settings
from sinks import clickhouse
from tests.api_keys import SERVER_SECRET


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    settings = replace(Settings.from_env(), server_secret=SERVER_SECRET)  # the API refuses to start without one
    stack.up(settings)
    return settings


@contextlib.contextmanager
def namespace(stack_settings: Settings):
    """A namespace of its own — topic prefix, consumer groups, Redis key prefix and ClickHouse database —
    created, migrated, and removed afterwards (topics too: the broker keeps files open per partition)."""
    uid = uuid.uuid4().hex[:8]
    s = replace(stack_settings, topic_prefix=f"t{uid}.", clickhouse_database=f"lstest_{uid}",
                sink_batch_ms=300, worker_batch_ms=50)
    asyncio.run(ensure_topics(s.kafka(), verbose=False))
    clickhouse.migrate(s.clickhouse(), verbose=False)
    try:
        yield s
    finally:
        drop_namespace(s)


@pytest.fixture
def settings(stack_settings: Settings):
    with namespace(stack_settings) as s:
        yield s


@pytest.fixture
def roles():
    """Collects started roles and stops them after the test, printing their logs on failure."""
    started: list[Role] = []
    yield started
    for role in started:
        role.stop()
