"""A definitions file (contract v1): `rules:`, `segments:`, `boards:` and/or `owners:` in YAML or JSON, validated
whole.

Every problem in a file is reported, each naming its entry and field (`rules[2] (id: hot-lead): when.url:
...`), and a file with any problem is refused whole: callers validate before they write anything.
References between entries (a rule's move_card board and stage; in_segment, a board's import) are
checked over the whole set: here within the file, in the definitions store over the file and what is
stored. A segment referred to must exist and be of the right kind, and segments refer to each other
without cycles. An owner named by a rule's assign_owner or a stage's assign must be one of the site's owners.

YAML is read with YAML 1.2 booleans (only true/false): in YAML 1.1 `on: account` would be the key True and
`no` would be False. A key given twice in one mapping is an error rather than silently the last value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.boards import BoardDefinition, Owner
from schemas.rules import PATTERN_MEANINGS, Rule
from schemas.segments import MAX_COUNTS, MAX_SEGMENTS, Segment
from schemas.settings import DefinitionLimits

MAX_FILE_CHARS = 1_000_000
MAX_OWNERS = 1000
KINDS = ("rules", "segments", "boards", "owners")


class DefinitionsError(ValueError):
    """A refused definitions file or entry. `problems` holds one line per problem; str() joins them.
    `limit`: refused because the site would exceed one of its limits (the definitions themselves are valid)."""

    def __init__(self, problems: list[str], limit: bool = False) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.limit = limit


class DefinitionInUse(DefinitionsError):
    """A delete refused because other definitions still refer to the entry (the API's 409)."""


class DefinitionsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list)
    segments: list[Segment] = Field(default_factory=list, max_length=MAX_SEGMENTS)
    boards: list[BoardDefinition] = Field(default_factory=list)
    owners: list[Owner] = Field(default_factory=list, max_length=MAX_OWNERS)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and refusing duplicate keys."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _parse(text: str, source: str) -> Any:
    if len(text) > MAX_FILE_CHARS:
        raise DefinitionsError([f"{source}: larger than {MAX_FILE_CHARS} characters"])
    if source.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise DefinitionsError([f"{source}: not valid JSON: {error}"]) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise DefinitionsError([f"{source}: {where}{error.problem or error.context}"]) from None
    except yaml.YAMLError as error:
        raise DefinitionsError([f"{source}: not valid YAML: {error}"]) from None


def entry_label(kind: str, index: int, raw: Any) -> str:
    """`rules[2] (id: hot-lead)`: how an entry is named in every message."""
    entry_id = raw.get("id") if isinstance(raw, dict) else None
    return f"{kind}[{index}]" + (f" (id: {entry_id})" if isinstance(entry_id, str) and entry_id else "")


def _field_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field missing"
    if error["type"] == "string_pattern_mismatch" and error["ctx"]["pattern"] in PATTERN_MEANINGS:
        return PATTERN_MEANINGS[error["ctx"]["pattern"]]
    return str(error["msg"]).removeprefix("Value error, ")


def _problems(error: ValidationError, data: dict[str, Any], source: str) -> list[str]:
    problems = []
    for item in error.errors():
        loc = item["loc"]
        if len(loc) >= 2 and loc[0] in KINDS and isinstance(loc[1], int):
            where, rest = entry_label(loc[0], loc[1], data[loc[0]][loc[1]]), loc[2:]
        else:
            where, rest = source, loc
        problems.append(f"{where}: {_field_path(rest) + ': ' if rest else ''}{_message(item)}")
    return problems


def duplicate_problems(data: Mapping[str, Any]) -> list[str]:
    """Ids repeated within a kind. Reads raw entries (`{"rules": [{"id": ...}, ...]}`), so a file's
    repeated ids are reported alongside its other problems."""
    problems = []
    for kind in KINDS:
        entries = data.get(kind)
        first: dict[str, int] = {}
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            entry_id = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(entry_id, str):
                continue
            if entry_id in first:
                problems.append(f"{entry_label(kind, index, entry)}: id: already used by {kind}[{first[entry_id]}]")
            first.setdefault(entry_id, index)
    return problems


def move_card_problems(rules: Iterable[tuple[str, Rule]], boards: Mapping[str, BoardDefinition], *,
                       unknown_board_ok: bool) -> list[str]:
    """Each labelled rule's move_card actions must name a stage of a board in `boards`. A file alone cannot
    know the stored boards, so it passes `unknown_board_ok` and leaves those to the store."""
    problems = []
    for label, rule in rules:
        for index, action in enumerate(rule.then):
            move = action.move_card
            if move is None:
                continue
            board = boards.get(move.board)
            if board is None:
                if not unknown_board_ok:
                    problems.append(f"{label}: then[{index}].move_card.board: no board {move.board!r}")
            elif all(stage.id != move.stage for stage in board.stages):
                stages = ", ".join(stage.id for stage in board.stages)
                problems.append(f"{label}: then[{index}].move_card.stage: board {move.board!r} has no stage "
                                f"{move.stage!r} (stages: {stages})")
    return problems


Labelled = Iterable[tuple[str, Any]]  # (how an entry is named in messages, the entry)


def owner_problems(rules: Labelled, boards: Labelled, owners: Iterable[str], *, unknown_ok: bool) -> list[str]:
    """Each labelled rule's assign_owner and each board stage's assign must name one of `owners` (the site's
    owner ids). A file alone cannot know the stored owners, so it passes `unknown_ok` and leaves those to the
    store."""
    if unknown_ok:
        return []
    known, problems = set(owners), []
    for label, rule in rules:
        for index, action in enumerate(rule.then):
            if action.assign_owner is not None and action.assign_owner not in known:
                problems.append(f"{label}: then[{index}].assign_owner: no owner {action.assign_owner!r}")
    for label, board in boards:
        for index, stage in enumerate(board.stages):
            missing = [owner for owner in (stage.assign.owner_ids() if stage.assign else ()) if owner not in known]
            if missing:
                problems.append(f"{label}: stages[{index}].assign: no owner {', '.join(map(repr, missing))}")
    return problems


def segment_problems(rules: Labelled, segments: Labelled, boards: Labelled, *, unknown_ok: bool) -> list[str]:
    """Each labelled entry's references to segments: in_segment (in rules, segments and the lead filters of
    account segments) and a board's import must name an existing segment of the right kind, and segments
    must not refer to each other in a cycle. Plus each segment's own placement checks (Segment.problems)
    and the site's caps. A file alone cannot know the stored segments, so it passes `unknown_ok`."""
    rules, segments, boards = list(rules), list(segments), list(boards)
    kinds = {segment.id: segment.of for _, segment in segments}
    problems = [f"{label}: {line}" for label, segment in segments for line in segment.problems()]

    def check(label: str, where: str, target: str, wanted: str, what: str) -> None:
        kind = kinds.get(target)
        if kind is None:
            if not unknown_ok:
                problems.append(f"{label}: {where}: no segment {target!r}")
        elif kind != wanted:
            article = "an" if kind == "account" else "a"
            problems.append(f"{label}: {where}: {target!r} is {article} {kind} segment; {what} names {wanted} segments")

    for label, rule in rules:
        for index, condition in enumerate(rule.if_):
            for target in condition.segments():
                check(label, f"if[{index}].in_segment", target, "lead", "a rule")
    for label, segment in segments:
        for where, target, wanted in segment.references():
            what = "an account segment" if wanted == "account" else (
                "a lead segment" if segment.of == "lead" else "a lead filter")
            check(label, f"{where}.in_segment", target, wanted, what)
    for label, board in boards:
        if board.import_ is None:
            continue
        target = board.import_.segment
        if target not in kinds:
            if not unknown_ok:
                problems.append(f"{label}: import.segment: no segment {target!r}")
        elif kinds[target] == "account" and board.card == "lead":
            problems.append(f"{label}: import.segment: {target!r} is an account segment; a board with lead "
                            "cards imports a lead segment (or use card: account)")
    problems += _cycle_problems(segments)
    if len(segments) > MAX_SEGMENTS:
        problems.append(f"segments: {len(segments)}; a site has at most {MAX_SEGMENTS}")
    counts = {count.key() for _, segment in segments for count in segment.counts()}
    if len(counts) > MAX_COUNTS:
        problems.append(f"segments: {len(counts)} different event counts; a site has at most {MAX_COUNTS} "
                        "(counts with the same event and filters share one)")
    return problems


def _cycle_problems(segments: list[tuple[str, Segment]]) -> list[str]:
    """One line per cycle of in_segment references, naming it (`a -> b -> a`), on its first segment.
    (A reference to a segment of the wrong kind is a problem of its own, not an edge.)"""
    labels = {segment.id: label for label, segment in segments}
    kinds = {segment.id: segment.of for _, segment in segments}
    edges = {segment.id: sorted({target for _, target, wanted in segment.references() if kinds.get(target) == wanted})
             for _, segment in segments}
    problems, done = [], set()
    for start in sorted(edges):
        path: list[str] = []

        def visit(node: str) -> None:
            if node in path:
                cycle = path[path.index(node):] + [node]
                if not set(cycle) & done:
                    problems.append(f"{labels[cycle[0]]}: in_segment: cycle {' -> '.join(cycle)}")
                    done.update(cycle)
                return
            if node in done:
                return
            path.append(node)
            for target in edges[node]:
                visit(target)
            path.pop()

        visit(start)
        done.add(start)
    return problems


def labelled(kind: str, entries: Iterable[Any]) -> list[tuple[str, Any]]:
    return [(entry_label(kind, index, {"id": entry.id}), entry) for index, entry in enumerate(entries)]


def limit_problems(rules: list[Rule], boards: int, rules_before: list[Rule], boards_before: int,
                   limits: DefinitionLimits, board_webhooks: tuple[int, int] = (0, 0)) -> list[str]:
    """What a write that leaves a site with `rules` and `boards` (it had `rules_before`, `boards_before`) would
    take over the site's limits. Only growth past a limit is refused: a site already over a lowered limit can
    still edit what it has. `board_webhooks`: the boards with on_stage_change (after, before), which count as
    webhook actions too."""
    def webhooks(of: list[Rule]) -> int:
        return sum(action.webhook is not None for rule in of for action in rule.then)

    counts = (("rules", len(rules), len(rules_before), limits.rules, "LEADSTREAM_MAX_RULES_PER_SITE"),
              ("boards", boards, boards_before, limits.boards, "LEADSTREAM_MAX_BOARDS_PER_SITE"),
              ("webhook actions", webhooks(rules) + board_webhooks[0], webhooks(rules_before) + board_webhooks[1],
             limits.webhook_actions,
               "LEADSTREAM_MAX_WEBHOOK_ACTIONS_PER_SITE"))
    return [f"a site has at most {limit} {what} ({setting}); this would make {after}"
            for what, after, before, limit, setting in counts if after > limit and after > before]


def load_definitions(text: str, source: str) -> DefinitionsFile:
    """Parses and validates a whole file; raises DefinitionsError listing every problem."""
    data = _parse(text, source)
    if data is None:
        raise DefinitionsError([f"{source}: empty file: expected rules:, segments:, boards: and/or owners:"])
    if not isinstance(data, dict):
        raise DefinitionsError([f"{source}: expected a mapping with rules:, segments:, boards: and/or owners:"])
    duplicates = duplicate_problems(data)
    try:
        definitions = DefinitionsFile.model_validate(data)
    except ValidationError as error:
        raise DefinitionsError(_problems(error, data, source) + duplicates) from None
    if not definitions.rules and not definitions.segments and not definitions.boards and not definitions.owners:
        raise DefinitionsError([f"{source}: no rules, no segments, no boards and no owners"])
    rules = labelled("rules", definitions.rules)
    problems = duplicates + move_card_problems(rules, {board.id: board for board in definitions.boards},
                                               unknown_board_ok=True)
    problems += segment_problems(rules, labelled("segments", definitions.segments),
                                 labelled("boards", definitions.boards), unknown_ok=True)
    if problems:
        raise DefinitionsError(problems)
    return definitions
