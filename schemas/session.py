"""The session record: one upsert on the `sessions` topic, one row version in ClickHouse.

Rows of one `session_id` collapse by `version` (ReplacingMergeTree). A row whose `merged_into` is set
is a tombstone: that id was superseded (an earlier event arrived, or two sessions merged) and the
session now lives under `merged_into`, which is always a current id (chains are one hop). A tombstone
carries only the ids, `start_ms` and `version`: analysts filter `merged_into = ''`.
`start_ms` never changes for a given `session_id` (the id is derived from the earliest event), so
tables may partition or order by it and all versions of a session still land together.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from schemas.records import build


@dataclass(slots=True)
class Session:
    """A visitor's session; first-touch fields come from its earliest event, `*_last` from its latest."""

    session_id: str
    site_id: str
    visitor_id: str
    session_index: int = 0
    previous_session_id: str = ""
    start_ms: int = 0
    end_ms: int = 0
    duration_ms: int = 0
    event_count: int = 0
    pageview_count: int = 0
    landing_url: str = ""
    exit_url: str = ""
    referrer: str = ""
    channel: str = ""
    utm_source: str = ""
    utm_medium: str = ""
    utm_campaign: str = ""
    utm_term: str = ""
    utm_content: str = ""
    click_id_type: str = ""
    click_id: str = ""
    utm_source_last: str = ""
    utm_medium_last: str = ""
    utm_campaign_last: str = ""
    click_id_last: str = ""
    device: str = ""
    browser: str = ""
    os: str = ""
    is_bot: bool = False
    email: str = ""
    is_closed: bool = False
    merged_into: str = ""
    version: int = 1

    def to_json(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> Session:
        """Ignores unknown keys, so a consumer keeps working when a later producer extends the record."""
        return build(cls, orjson.loads(data))
