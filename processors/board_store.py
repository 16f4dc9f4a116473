"""Redis adapter for live board state: the read model of the board-state API and its live feed.

Write side: `queue_changes` and `queue_command_result` only queue `Writes` on the caller's commit (the
board processor's batch), so the board writes of a batch commit in the same transaction as the card states
and the partition watermark that guard them. Every write is an absolute value (a view, a column
membership) except the feed append and the version bump, so a batch written twice leaves the same board,
one version further.

Read side: a board page is read by one Lua call, so its columns, counts, version (the ETag) and the feed
position it corresponds to are one consistent snapshot; the API then streams the feed from that position.

Keys (schemas/redis_keys.py): per board its card views and notes (hashes), a column per stage (a zset of
card ids scored by the time they entered it), the live feed (a stream of about FEED_MAXLEN entries
{type, data}) and the version (bumped once per committed batch that changes the board); per card its state
(written by the board processor's commit); per command its result, for COMMAND_RESULT_TTL_S.
Feed entry types: `stage_change` (StageChange JSON), `card` (CardView JSON), `card_removed`
({"card_id"}), `reset` (the board was rebuilt: clients reload it).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from processors.boards import CardState, ViewChange
from processors.runtime.writes import RedisWrites, Writes
from schemas.boards import BoardDefinition, CardNote, CardView, CommandResult, StageChange
from schemas.redis_keys import RedisKeys

FEED_MAXLEN = 10_000
COMMAND_RESULT_TTL_S = 86_400
MAX_PAGE = 500
START = "0-0"
_STREAM_ID = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")

_READ_BOARD = """
local limit = tonumber(ARGV[1])
local out = {redis.call('GET', KEYS[1]) or '0'}
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
out[2] = last[1] and last[1][1] or '0-0'
for i = 4, #KEYS do
  local offset = tonumber(ARGV[i - 2])
  local views = {}
  if limit > 0 then
    local ids = redis.call('ZREVRANGE', KEYS[i], offset, offset + limit - 1)
    if #ids > 0 then views = redis.call('HMGET', KEYS[2], unpack(ids)) end
  end
  out[#out + 1] = redis.call('ZCARD', KEYS[i])
  out[#out + 1] = views
end
return out
"""


@dataclass(slots=True, frozen=True)
class Column:
    stage_id: str
    name: str
    count: int
    offset: int
    cards: list[CardView]  # most recently entered first


@dataclass(slots=True, frozen=True)
class BoardPage:
    version: int  # the ETag
    feed_id: str  # the feed entry this snapshot includes: stream the board from here
    columns: list[Column]


@dataclass(slots=True, frozen=True)
class FeedEntry:
    id: str
    type: str
    data: bytes  # JSON, ready for a server-sent event


@dataclass(slots=True, frozen=True)
class FeedPage:
    entries: list[FeedEntry]
    trimmed: bool  # entries after the given id are gone (trimmed, or the board was rebuilt): reload


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_stream_id(stream_id: str) -> tuple[int, int]:
    """(ms, seq) of a feed entry id such as a Last-Event-ID header; ValueError if it is not one."""
    match = _STREAM_ID.match(stream_id.strip())
    if match is None:
        raise ValueError(f"not a feed position: {stream_id[:64]!r}")
    return int(match[1]), int(match[2] or 0)


class BoardStore:
    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis = redis
        self.keys = RedisKeys(prefix)
        self._read_board = redis.register_script(_READ_BOARD)

    # -- write side: queued on the caller's commit ----------------------------------------------------------

    def queue_changes(self, writes: Writes, site_id: str, stage_changes: Sequence[StageChange],
                      views: Sequence[ViewChange]) -> None:
        """Queue one batch's board writes (views in the order produced, several per card allowed): column
        memberships, views, notes, feed entries, and one version bump per board touched."""
        boards = sorted({c.board_id for c in stage_changes} | {v.board_id for v in views})
        for board_id in boards:
            self._queue_board(writes, site_id, board_id, [c for c in stage_changes if c.board_id == board_id],
                              [v for v in views if v.board_id == board_id])

    def _queue_board(self, writes: Writes, site_id: str, board_id: str, stage_changes: list[StageChange],
                     views: list[ViewChange]) -> None:
        latest: dict[str, ViewChange] = {}
        columns_left: dict[str, set[str]] = {}
        notes: dict[str, tuple[CardNote, ...]] = {}
        for change in views:
            latest[change.card_id] = change
            if change.left_stage:
                columns_left.setdefault(change.card_id, set()).add(change.left_stage)
            if change.notes is not None:
                notes[change.card_id] = change.notes
        removals: dict[str, list[str]] = {}
        additions: dict[str, dict[str, int]] = {}
        for card_id, change in latest.items():
            final_stage = change.view.stage_id if change.view is not None else ""
            for stage in columns_left.get(card_id, set()) - {final_stage}:
                removals.setdefault(stage, []).append(card_id)
            if change.view is not None:
                additions.setdefault(final_stage, {})[card_id] = change.view.entered_stage_ms
        keys = self.keys
        for stage, card_ids in sorted(removals.items()):
            writes.zset_remove(keys.board_column(site_id, board_id, stage), *card_ids)
        for stage, members in sorted(additions.items()):
            writes.zset_add(keys.board_column(site_id, board_id, stage), members)
        cards_key, notes_key = keys.board_cards(site_id, board_id), keys.board_notes(site_id, board_id)
        shown = {card_id: c.view.to_json() for card_id, c in latest.items() if c.view is not None}
        gone = [card_id for card_id, c in latest.items() if c.view is None]
        if shown:
            writes.hash_set(cards_key, shown)
        notes_shown = {card_id: orjson.dumps(n) for card_id, n in notes.items() if card_id in shown}
        if notes_shown:
            writes.hash_set(notes_key, notes_shown)
        if gone:
            writes.hash_delete(cards_key, *gone)
            writes.hash_delete(notes_key, *gone)
        feed = keys.board_feed(site_id, board_id)
        entries = [("stage_change", c.to_json()) for c in stage_changes]
        entries += [("card", c.view.to_json()) if c.view is not None
                    else ("card_removed", orjson.dumps({"card_id": c.card_id})) for c in latest.values()]
        for kind, data in entries:
            writes.stream_add(feed, {"type": kind, "data": data}, FEED_MAXLEN)
        writes.increment(keys.board_version(site_id, board_id))

    def queue_command_result(self, writes: Writes, result: CommandResult) -> None:
        """The first outcome of a command stays: a redelivered command cannot overwrite it."""
        writes.set_if_absent(self.keys.command_result(result.site_id, result.command_id), result.to_json(),
                             COMMAND_RESULT_TTL_S * 1000)

    async def clear_board(self, site_id: str, board_id: str) -> None:
        """Empty a board before a rebuild. The version goes on (a stale If-Match must never match again)
        and the feed restarts with a `reset` entry, so connected clients reload."""
        keys = self.keys
        pattern = keys.board_columns_pattern(site_id, board_id)
        columns = [key async for key in self.redis.scan_iter(match=pattern, count=1000)]
        async with self.redis.pipeline(transaction=True) as pipe:
            writes, feed = RedisWrites(pipe), keys.board_feed(site_id, board_id)
            writes.delete(keys.board_cards(site_id, board_id), keys.board_notes(site_id, board_id), feed, *columns)
            writes.stream_add(feed, {"type": "reset", "data": b"{}"}, FEED_MAXLEN)
            writes.increment(keys.board_version(site_id, board_id))
            await pipe.execute()

    # -- read side ----------------------------------------------------------------------------------------

    async def load_cards(self, site_id: str, card_ids: Sequence[str]) -> dict[str, CardState | None]:
        if not card_ids:
            return {}
        blobs = await self.redis.mget([self.keys.card_state(site_id, card_id) for card_id in card_ids])
        return {card_id: CardState.from_json(blob) if blob else None for card_id, blob in zip(card_ids, blobs)}

    async def board(self, site_id: str, board: BoardDefinition, limit_per_stage: int = 50,
                    offsets: Mapping[str, int] | None = None) -> BoardPage:
        """Every column's count and one page of its cards (most recently entered first); `offsets` pages a
        column further. One consistent snapshot with its version and feed position."""
        limit = max(0, min(limit_per_stage, MAX_PAGE))
        offsets = offsets or {}
        starts = [max(0, int(offsets.get(stage.id, 0))) for stage in board.stages]
        keys = [self.keys.board_version(site_id, board.id), self.keys.board_cards(site_id, board.id),
                self.keys.board_feed(site_id, board.id)]
        keys += [self.keys.board_column(site_id, board.id, stage.id) for stage in board.stages]
        raw = await self._read_board(keys=keys, args=[limit, *starts])
        columns = [
            Column(stage.id, stage.name, int(raw[2 + 2 * i]), start,
                   [CardView.from_json(view) for view in raw[3 + 2 * i] if view])
            for i, (stage, start) in enumerate(zip(board.stages, starts))
        ]
        return BoardPage(int(raw[0]), _text(raw[1]), columns)

    async def column_card_ids(self, site_id: str, board_id: str, stage_id: str) -> AsyncIterator[str]:
        """Every card in a column, a few hundred per Redis call (SCAN: no call blocks Redis on a long column;
        a card that stays in the column throughout is listed at least once)."""
        async for card_id, _ in self.redis.zscan_iter(self.keys.board_column(site_id, board_id, stage_id), count=500):
            yield _text(card_id)

    async def card(self, site_id: str, board_id: str, card_id: str) -> CardView | None:
        blob = await self.redis.hget(self.keys.board_cards(site_id, board_id), card_id)
        return CardView.from_json(blob) if blob else None

    async def card_notes(self, site_id: str, board_id: str, card_id: str) -> list[CardNote]:
        blob = await self.redis.hget(self.keys.board_notes(site_id, board_id), card_id)
        return [CardNote.from_dict(note) for note in orjson.loads(blob)] if blob else []

    async def version(self, site_id: str, board_id: str) -> int:
        return int(await self.redis.get(self.keys.board_version(site_id, board_id)) or 0)

    async def command_result(self, site_id: str, command_id: str) -> CommandResult | None:
        blob = await self.redis.get(self.keys.command_result(site_id, command_id))
        return CommandResult.from_json(blob) if blob else None

    async def feed_after(self, site_id: str, board_id: str, last_id: str = START, count: int = 500) -> FeedPage:
        """Feed entries after `last_id` (a previous entry's id, or START). `trimmed` when the feed no longer
        holds everything after it (entries trimmed, the board rebuilt, or an id this feed never issued):
        the client must reload the board instead of resuming."""
        after = parse_stream_id(last_id)
        feed = self.keys.board_feed(site_id, board_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xinfo_stream(feed)
            pipe.xrange(feed, f"({after[0]}-{after[1]}", "+", count=max(1, min(count, 10 * MAX_PAGE)))
            info, rows = await pipe.execute(raise_on_error=False)
        if isinstance(info, Exception):  # no feed at all
            return FeedPage([], after != (0, 0))
        first = parse_stream_id(_text(info["recorded-first-entry-id"]))
        dropped = int(info["entries-added"]) > int(info["length"])
        trimmed = after > parse_stream_id(_text(info["last-generated-id"])) or (dropped and after < first)
        return FeedPage([] if trimmed else [self._entry(row) for row in rows], trimmed)

    async def wait_feed(self, site_id: str, board_id: str, last_id: str, block_ms: int, count: int = 500) -> FeedPage:
        """Like feed_after, but waits up to block_ms for an entry after last_id (XREAD BLOCK)."""
        ms, seq = parse_stream_id(last_id)
        woke = await self.redis.xread({self.keys.board_feed(site_id, board_id): f"{ms}-{seq}"}, count=1, block=block_ms)
        if not woke:
            return FeedPage([], False)
        return await self.feed_after(site_id, board_id, last_id, count)

    @staticmethod
    def _entry(row: tuple) -> FeedEntry:
        entry_id, fields = row
        values = {_text(k): v for k, v in fields.items()}
        data = values["data"]
        return FeedEntry(_text(entry_id), _text(values["type"]), data.encode() if isinstance(data, str) else data)
