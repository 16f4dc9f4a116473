"""Segment history and membership on the real ClickHouse 18.16: the same checks as on current ClickHouse."""

from __future__ import annotations

import pytest

from sinks import clickhouse
from tests.test_segment_history import run_history

pytestmark = pytest.mark.integration


def test_history_and_current_members_on_clickhouse_18(settings):
    client = clickhouse.connect(settings.clickhouse())
    run_history(client, lambda table, columns, rows: clickhouse.insert_columnar(client, table, columns, rows))
