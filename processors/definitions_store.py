"""Redis adapter for a site's rules, segments and boards (the definitions), with versions a running
processor can poll.

One hash per site holds everything: field `version` (the site's definitions version, bumped by every
change), `rule:<id>`, `segment:<id>`, `board:<id>` and `owner:<id>` (JSON `{"version", "definition"}`). A single HGETALL
is therefore an atomic snapshot, and HGET of `version` is the cheap poll. An entry's version is the site
version at which it last changed: it only grows, and a deleted then re-created entry never reuses an old
version.

Writes are optimistic: WATCH the site hash, read, validate the whole resulting set of definitions
(a rule's move_card must name an existing board and stage; in_segment and a board's import an existing
segment of the right kind; no cycles among segments; the site stays within its limits of rules, boards and
webhook actions), then MULTI/EXEC; a concurrent writer makes EXEC fail and the write is recomputed. Nothing
is written unless everything is valid. A delete that would leave a reference dangling (a board importing the
segment, a rule moving cards on the board, ...) is refused with DefinitionInUse.

A write that creates, edits or deletes a segment, or gives a board a new `import`, also asks for a segment
backfill, in the same transaction (so no edit can be stored without it, whoever made it: the CLI, the API):
`backfill:wanted` gets the new site version, and `backfill:since` keeps the site's segments from before the
first edit not yet backfilled. The backfill job (processors/segment_backfill.py) brings every lead up to date
from there: history for new counts, and the import step for boards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from processors.webhooks import WebhookTargets, board_webhook_problems, definition_problems
from schemas.boards import BoardDefinition, Owner
from schemas.definitions import (
    KINDS,
    DefinitionInUse,
    DefinitionsError,
    DefinitionsFile,
    duplicate_problems,
    entry_label,
    limit_problems,
    move_card_problems,
    owner_problems,
    segment_problems,
)
from schemas.redis_keys import RedisKeys
from schemas.rules import Rule
from schemas.segments import Segment
from schemas.settings import DefinitionLimits, Settings

MAX_WRITE_ATTEMPTS = 20
_VERSION = b"version"


@dataclass(frozen=True, slots=True)
class StoredBoard:
    board: BoardDefinition
    version: int


@dataclass(frozen=True, slots=True)
class SiteDefinitions:
    """A consistent snapshot of one site. Rules and segments carry their versions; every list is in id
    order."""

    version: int
    rules: list[Rule]
    boards: list[StoredBoard]
    segments: list[Segment]
    owners: list[Owner] = dataclasses.field(default_factory=list)

    def segments_snapshot(self) -> bytes:
        """The site's segments at this version, as a backfill request keeps them (`segments_at` reads it)."""
        return orjson.dumps({"version": self.version, "segments": [
            {"version": segment.version, "definition": segment.content()} for segment in self.segments]})

    def entries(self) -> dict[str, Definition]:
        """'rule:<id>' / 'segment:<id>' / 'board:<id>' -> the definition."""
        entries: dict[str, Definition] = {f"rule:{r.id}": r for r in self.rules}
        entries.update({f"segment:{s.id}": s for s in self.segments})
        entries.update({f"board:{b.board.id}": b.board for b in self.boards})
        entries.update({f"owner:{o.id}": o for o in self.owners})
        return entries


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """versions: every entry of the file ('rule:<id>' / 'segment:<id>' / 'board:<id>') -> its version
    after the write. changed: the entries that were new or different (only those got a new version).
    replaced: what the changed entries that existed before were (a board edit's consequences depend on the
    board it replaced)."""

    site_version: int
    versions: dict[str, int]
    changed: list[str]
    replaced: dict[str, Definition]


Definition = Rule | Segment | BoardDefinition | Owner
Plan = Callable[["SiteDefinitions"], tuple[dict[str, Definition], list[str]]]
_VERSIONED = (Rule, Segment)  # models that carry the store's version


def _content(entry: Definition) -> dict[str, Any]:
    """As written (what GET shows), without the version."""
    return entry.content()


def _meaning(entry: Definition) -> dict[str, Any]:
    """What 'changed' is compared on: defaults filled in, so `once: per_lead` equals leaving it out."""
    return entry.model_dump(mode="json", exclude={"version"} if isinstance(entry, _VERSIONED) else None)


def _versioned(model: type[Rule] | type[Segment], stored: dict[str, Any]) -> Any:
    return model.model_validate({**stored["definition"], "version": stored["version"]})


def segments_at(snapshot: bytes) -> tuple[int, list[Segment]]:
    """(site version, segments) of a `SiteDefinitions.segments_snapshot`."""
    stored = orjson.loads(snapshot)
    return stored["version"], [_versioned(Segment, segment) for segment in stored["segments"]]


def _wants_backfill(before: SiteDefinitions, writes: dict[str, Definition], deletes: list[str]) -> bool:
    """Whether a write changes what segment memberships (or a board's import of them) rest on."""
    if any(name.startswith("segment:") for name in [*writes, *deletes]):
        return True
    boards = {f"board:{stored.board.id}": stored.board for stored in before.boards}
    return any(isinstance(entry, BoardDefinition) and entry.import_ is not None
               and (name not in boards or boards[name].import_ != entry.import_) for name, entry in writes.items())


def _decode(fields: dict[bytes, bytes]) -> SiteDefinitions:
    rules, boards, segments, owners = [], [], [], []
    for name, raw in sorted(fields.items()):
        if name == _VERSION:
            continue
        stored = orjson.loads(raw)
        kind, _, _ = name.decode().partition(":")
        if kind == "rule":
            rules.append(_versioned(Rule, stored))
        elif kind == "segment":
            segments.append(_versioned(Segment, stored))
        elif kind == "owner":
            owners.append(Owner.model_validate(stored["definition"]))
        else:
            boards.append(StoredBoard(BoardDefinition.model_validate(stored["definition"]), stored["version"]))
    return SiteDefinitions(int(fields.get(_VERSION, 0)), rules, boards, segments, owners)


class DefinitionsStore:
    """`limits`: the per-site caps on rules, boards and webhook actions. `webhook_targets`: the allowlist a
    rule's webhook URL is checked against when it is written; None reads the process's setting
    (LEADSTREAM_WEBHOOK_ALLOWED_TARGETS), the same one the webhooks processor reads."""

    def __init__(self, redis: aioredis.Redis, prefix: str, limits: DefinitionLimits = DefinitionLimits(), *,
                 webhook_targets: WebhookTargets | None = None):
        self.redis = redis
        self.limits = limits
        if webhook_targets is None:
            webhook_targets = WebhookTargets.parse(Settings.from_env().webhook_allowed_targets)
        self.webhook_targets = webhook_targets
        self.keys = keys = RedisKeys(prefix)
        self._site_key = keys.site_definitions
        self._sites_key = keys.definitions_sites

    async def site_version(self, site: str) -> int:
        """The cheap poll: 0 for a site that never had definitions."""
        return int(await self.redis.hget(self._site_key(site), "version") or 0)

    async def load(self, site: str) -> SiteDefinitions:
        return _decode(await self.redis.hgetall(self._site_key(site)))

    async def sites(self) -> list[str]:
        return sorted(site.decode() for site in await self.redis.smembers(self._sites_key))

    async def get_rule(self, site: str, rule_id: str) -> Rule | None:
        raw = await self.redis.hget(self._site_key(site), f"rule:{rule_id}")
        return None if raw is None else _versioned(Rule, orjson.loads(raw))

    async def get_segment(self, site: str, segment_id: str) -> Segment | None:
        raw = await self.redis.hget(self._site_key(site), f"segment:{segment_id}")
        return None if raw is None else _versioned(Segment, orjson.loads(raw))

    async def get_board(self, site: str, board_id: str) -> StoredBoard | None:
        raw = await self.redis.hget(self._site_key(site), f"board:{board_id}")
        if raw is None:
            return None
        stored = orjson.loads(raw)
        return StoredBoard(BoardDefinition.model_validate(stored["definition"]), stored["version"])

    async def get_owner(self, site: str, owner_id: str) -> Owner | None:
        raw = await self.redis.hget(self._site_key(site), f"owner:{owner_id}")
        return None if raw is None else Owner.model_validate(orjson.loads(raw)["definition"])

    async def list_owners(self, site: str) -> list[Owner]:
        return (await self.load(site)).owners

    async def list_rules(self, site: str) -> list[Rule]:
        return (await self.load(site)).rules

    async def list_boards(self, site: str) -> list[StoredBoard]:
        return (await self.load(site)).boards

    async def list_segments(self, site: str) -> list[Segment]:
        return (await self.load(site)).segments

    async def apply(self, site: str, definitions: DefinitionsFile) -> ApplyResult:
        """Upserts every rule, segment and board of the file (entries not in the file stay). Refuses the
        whole file with DefinitionsError if the site's definitions would then not hold together (see the
        module docstring), or if a webhook of the file signs with a variable that is not one of the site's
        secrets or posts to a target that is not allowed."""
        problems = duplicate_problems({kind: [{"id": e.id} for e in getattr(definitions, kind)] for kind in KINDS})
        problems += definition_problems(site, ((entry_label("rules", i, {"id": rule.id}), rule)
                                               for i, rule in enumerate(definitions.rules)), self.webhook_targets)
        problems += board_webhook_problems(site, ((entry_label("boards", i, {"id": board.id}), board)
                                                  for i, board in enumerate(definitions.boards)), self.webhook_targets)
        if problems:
            raise DefinitionsError(problems)
        entries: dict[str, Definition] = {f"rule:{rule.id}": rule for rule in definitions.rules}
        entries.update({f"segment:{segment.id}": segment for segment in definitions.segments})
        entries.update({f"board:{board.id}": board for board in definitions.boards})
        entries.update({f"owner:{owner.id}": owner for owner in definitions.owners})

        def plan(current: SiteDefinitions) -> tuple[dict[str, Definition], list[str]]:
            stored = current.entries()
            merged = stored | entries
            self._check_references(merged)
            rules = [entry for entry in merged.values() if isinstance(entry, Rule)]
            boards = sum(isinstance(entry, BoardDefinition) for entry in merged.values())
            hooks = (sum(isinstance(entry, BoardDefinition) and entry.on_stage_change is not None
                         for entry in merged.values()),
                     sum(stored.board.on_stage_change is not None for stored in current.boards))
            problems = limit_problems(rules, boards, current.rules, len(current.boards), self.limits, hooks)
            if problems:
                raise DefinitionsError(problems, limit=True)
            changed = [name for name, entry in entries.items()
                       if name not in stored or _meaning(stored[name]) != _meaning(entry)]
            return {name: entries[name] for name in changed}, []

        return await self._write(site, plan, versions_of=list(entries))

    async def put_rule(self, site: str, rule: Rule) -> int:
        """Creates or replaces one rule; returns its version (unchanged when the rule is the same)."""
        return (await self.apply(site, DefinitionsFile(rules=[rule]))).versions[f"rule:{rule.id}"]

    async def put_board(self, site: str, board: BoardDefinition) -> ApplyResult:
        """Creates or replaces one board; the result has its version and the board it replaced."""
        return await self.apply(site, DefinitionsFile(boards=[board]))

    async def put_segment(self, site: str, segment: Segment) -> int:
        return (await self.apply(site, DefinitionsFile(segments=[segment]))).versions[f"segment:{segment.id}"]

    async def delete_rule(self, site: str, rule_id: str) -> bool:
        """True if the rule existed (and is now deleted). Refused (DefinitionInUse) while it is referred to."""
        return await self._delete(site, f"rule:{rule_id}")

    async def put_owner(self, site: str, owner: Owner) -> int:
        """Creates or replaces one owner; returns its version."""
        return (await self.apply(site, DefinitionsFile(owners=[owner]))).versions[f"owner:{owner.id}"]

    async def delete_owner(self, site: str, owner_id: str) -> bool:
        """Refused (DefinitionInUse) while a board's assignment or a rule's assign_owner names the owner."""
        return await self._delete(site, f"owner:{owner_id}")

    async def delete_segment(self, site: str, segment_id: str) -> bool:
        """Refused (DefinitionInUse) while a board imports it, or a rule or segment names it in in_segment."""
        return await self._delete(site, f"segment:{segment_id}")

    async def _delete(self, site: str, name: str) -> bool:
        def plan(current: SiteDefinitions) -> tuple[dict[str, Definition], list[str]]:
            remaining = {entry: definition for entry, definition in current.entries().items() if entry != name}
            try:
                self._check_references(remaining)
            except DefinitionsError as error:
                kind, _, entry_id = name.partition(":")
                raise DefinitionInUse([f"{kind} {entry_id!r} is in use: {line}" for line in error.problems]
                                      ) from None
            return {}, [name]

        result = await self._write(site, plan, versions_of=[])
        return name in result.changed

    @staticmethod
    def _check_references(entries: dict[str, Definition]) -> None:
        """The whole set must hold together; each problem names its entry as `rule <id>` etc."""
        def of(model: type) -> list[tuple[str, Any]]:
            return sorted((name.replace(":", " ", 1), entry) for name, entry in entries.items()
                          if isinstance(entry, model))

        rules, boards = of(Rule), of(BoardDefinition)
        problems = move_card_problems(rules, {board.id: board for _, board in boards}, unknown_board_ok=False)
        problems += segment_problems(rules, of(Segment), boards, unknown_ok=False)
        problems += owner_problems(rules, boards, [owner.id for _, owner in of(Owner)], unknown_ok=False)
        if problems:
            raise DefinitionsError(problems)

    async def _write(self, site: str, plan: Plan, versions_of: list[str]) -> ApplyResult:
        """Runs `plan(current) -> (entries to write, names to delete)` under WATCH and writes its result
        in one MULTI/EXEC, bumping the site version when anything changes."""
        key = self._site_key(site)
        for _ in range(MAX_WRITE_ATTEMPTS):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    fields = await pipe.hgetall(key)
                    current = _decode(fields)
                    writes, deletes = plan(current)
                    deletes = [name for name in deletes if name.encode() in fields]
                    version = current.version + 1 if writes or deletes else current.version
                    pipe.multi()
                    if writes or deletes:
                        pipe.hset(key, mapping={
                            "version": version,
                            **{name: orjson.dumps({"version": version, "definition": _content(entry)})
                               for name, entry in writes.items()},
                        })
                        if deletes:
                            pipe.hdel(key, *deletes)
                        pipe.sadd(self._sites_key, site)
                        if _wants_backfill(current, writes, deletes):
                            pipe.hsetnx(self.keys.backfill_since, site, current.segments_snapshot())
                            pipe.hset(self.keys.backfill_wanted, site, version)
                    await pipe.execute()
                except WatchError:
                    continue
            stored_versions = {name: orjson.loads(raw)["version"] for name, raw in fields.items() if name != _VERSION}
            versions = {name: version if name in writes else stored_versions[name.encode()] for name in versions_of}
            changed = sorted([*writes, *deletes])
            before = current.entries()
            return ApplyResult(version, versions, changed, {name: before[name] for name in changed if name in before})
        raise RuntimeError(f"definitions of site {site!r} changed {MAX_WRITE_ATTEMPTS} times during one write")
