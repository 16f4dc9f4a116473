"""Operator commands: load the IP-range table and company cards, add accounts by hand."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import orjson

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from api.commands import CommandBus
from api.problems import Problem
from processors import webhooks
from processors.app import BOARD_PROCESSOR_GROUP
from processors.board_processor import BoardProcessor
from processors.board_store import BoardStore
from processors.definitions_store import ApplyResult, DefinitionsStore
from processors.runtime.ingest import Message
from processors.runtime.ingest import consumer as kafka_consumer
from processors.runtime.redis_client import redis_from_url
from processors.runtime.runner import ProcessorRunner
from processors.runtime.state import RedisStateStore
from processors.site_definitions import SiteDefinitionsCache
from processors.accounts import AccountRefused, BadLine, IpRangeTable, manual_account
from processors.companies import CompanyStore, publish_cards, read_company_file
from processors.lookup_tables import LookupTables, publish_ip_ranges
from processors.segment_backfill import backfill_status
from processors.runtime.producer import BatchProducer
from schemas.boards import BoardDefinition
from schemas.definitions import DefinitionsError, load_definitions
from schemas.redis_keys import RedisKeys
from schemas.settings import Settings
from schemas.topics import BOARD_COMMANDS, EVENTS_DLQ
from sinks import clickhouse


CLI_ACTOR = "user:cli"  # the actor of what an operator's command changes on a board


def load_ip_ranges(settings: Settings, path: str) -> int:
    """Validate a `cidr,domain,company_name[,kind]` CSV and publish it to every worker (via Redis)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        print(f"leadstream ip-ranges load: cannot read {path}: {err.strerror}", file=sys.stderr)
        return 2
    return publish_ip_table(settings, text)


def _print_bad_lines(bad: list[BadLine], what: str = "lines") -> None:
    for line in bad[:20]:
        print(f"  line {line.line_no}: {line.reason}: {line.text[:80]!r}")
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more bad {what}")


def publish_ip_table(settings: Settings, text: str) -> int:
    table, bad = IpRangeTable.from_lines(text.splitlines())
    _print_bad_lines(bad)

    async def publish() -> None:
        redis = redis_from_url(settings.redis_url)
        try:
            await publish_ip_ranges(redis, settings.name("ls"), text)
        finally:
            await redis.aclose()

    asyncio.run(publish())
    print(f"loaded {len(table):,} ranges ({len(bad)} bad lines skipped); running workers pick them up within"
          " about a second")
    return 0


def load_companies(settings: Settings, path: str) -> int:
    """`leadstream companies load FILE.csv|FILE.jsonl`: validate every row, load the good ones, list the bad
    ones with their line and reason. Cards equal to the stored ones are left alone, so loading the same
    file again changes nothing."""
    jsonl = Path(path).suffix.lower() in (".jsonl", ".ndjson")
    if not jsonl and Path(path).suffix.lower() != ".csv":
        print(f"leadstream companies load: {path}: give a .csv or .jsonl file", file=sys.stderr)
        return 2
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        print(f"leadstream companies load: cannot read {path}: {err.strerror}", file=sys.stderr)
        return 2
    cards, bad = read_company_file(text, jsonl, int(time.time() * 1000))
    _print_bad_lines(bad, "rows")

    async def publish() -> tuple[int, int]:
        redis = redis_from_url(settings.redis_url)
        producer = BatchProducer(settings.kafka(), EVENTS_DLQ)
        try:
            store = CompanyStore(redis, settings.name("ls"))
            stored = await store.get_many([card.domain for card in cards])
            changed = [card for card in cards if card.domain not in stored or not stored[card.domain].same_card(card)]
            if changed:
                await producer.start()
                await publish_cards(changed, store, producer, settings.partitions)
            return len(changed), sum(card.domain not in stored for card in changed)
        finally:
            await producer.stop()
            await redis.aclose()

    changed, new = asyncio.run(publish())
    print(f"{len(cards):,} company cards in {path}: {new:,} new, {changed - new:,} changed, {len(cards) - changed:,}"
          f" unchanged; {len(bad):,} rows refused. Running workers pick them up within about a second")
    return 0


def add_account(settings: Settings, site_id: str, domain: str, company_name: str = "") -> int:
    """Add an account by hand (normalised to its registrable domain; free-mail providers refused)."""
    try:
        hint = manual_account(domain)
    except AccountRefused as err:
        print(f"leadstream account add: refused {domain!r}: {err}", file=sys.stderr)
        return 2
    clickhouse.insert_columnar(
        clickhouse.connect(settings.clickhouse()), "manual_accounts", ("site_id", "domain", "company_name", "added_ms"),
        [(site_id, hint.domain, company_name, int(time.time() * 1000))],
    )
    print(f"account {hint.domain} added to site {site_id}")
    return 0


def apply_definitions(settings: Settings, path: str, site_id: str, expect: str) -> int:
    """`leadstream rules|segments|boards apply FILE --site S`: validate the whole file, then store it in one
    write. Whichever command applies it, every list of the file (rules, segments, boards) is applied."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        print(f"leadstream {expect} apply: cannot read {path}: {err.strerror}", file=sys.stderr)
        return 2
    return apply_definitions_text(settings, text, path, site_id, expect)


def apply_definitions_text(settings: Settings, text: str, path: str, site_id: str, expect: str) -> int:
    """`apply_definitions` of a file's text (`path` names it in messages; its extension picks JSON or YAML)."""
    try:
        definitions = load_definitions(text, path)
    except DefinitionsError as err:
        print(f"leadstream {expect} apply: {path} refused, nothing changed:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2

    async def store() -> tuple[ApplyResult, int | None]:
        """Apply the file; then move the cards of any stage it deleted (as PUT boards/{board} does). Also
        returns the version a segment backfill is wanted for, if any (the store asks for it with the edit)."""
        redis = redis_from_url(settings.redis_url)
        commands = CommandBus(settings, BoardStore(redis, settings.name("ls")))
        try:
            result = await DefinitionsStore(redis, settings.name("ls"), settings.definition_limits(),
                                             webhook_targets=webhooks.WebhookTargets.parse(settings.webhook_allowed_targets)).apply(
                site_id, definitions)
            for board in definitions.boards:
                before = result.replaced.get(f"board:{board.id}")
                if isinstance(before, BoardDefinition):
                    moved = await commands.move_out_of_deleted_stages(site_id, CLI_ACTOR, before, board,
                                                                      result.versions[f"board:{board.id}"])
                    if moved:
                        print(f"  board {board.id}: {moved} cards of deleted stages sent to the board processor")
            return result, (await backfill_status(redis, settings.name("ls"), site_id))[0]
        finally:
            await commands.stop()
            await redis.aclose()

    try:
        result, backfill = asyncio.run(store())
    except DefinitionsError as err:
        print(f"leadstream {expect} apply: {path} refused, nothing changed:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except Problem as err:  # Kafka unavailable: the file is applied, the cards of its deleted stages did not move
        print(f"leadstream {expect} apply: {path} applied, but the cards of its deleted stages could not be "
              f"moved ({err.title}): apply the board with those stages again, then without them", file=sys.stderr)
        return 1
    print(f"site {site_id}: {len(definitions.rules)} rules, {len(definitions.segments)} segments, "
          f"{len(definitions.boards)} boards in {path}; {len(result.changed)} new or changed "
          f"(definitions version {result.site_version})")
    for entry in result.changed:
        print(f"  {entry} -> version {result.versions[entry]}")
    print("running workers pick the change up within about a second")
    if backfill is not None:
        print(f"segment backfill wanted up to version {backfill}: the workers that run the lead processor bring every lead up"
              f" to date and boards that import a segment get its members (`leadstream segments list --site"
              f" {site_id}` shows when it is done)")
    return 0


def list_definitions(settings: Settings, site_id: str, kind: str) -> int:
    """`leadstream rules|boards|owners list --site S`: every rule, segment, board and owner (with versions);
    `leadstream segments list --site S`: the segments, what they are of, and the boards importing them."""

    async def load():
        redis = redis_from_url(settings.redis_url)
        try:
            return (await DefinitionsStore(redis, settings.name("ls")).load(site_id),
                    await backfill_status(redis, settings.name("ls"), site_id))
        finally:
            await redis.aclose()

    site, (pending, done) = asyncio.run(load())
    print(f"site {site_id}, definitions version {site.version}")
    if kind == "segments":
        if done is not None:
            print(f"  last segment backfill: version {done.version}, {done.leads:,} leads, {done.history_rows:,} "
                  f"history rows, {done.seconds:.1f} s")
        if pending is not None:
            print(f"  segment backfill pending up to version {pending} (run by the workers that run the lead processor)")
        for segment in site.segments:
            importers = [stored.board.id for stored in site.boards
                         if stored.board.import_ and stored.board.import_.segment == segment.id]
            print(f"  segment {segment.id:<28} v{segment.version:<4} of {segment.of:<7} "
                  f"{len(segment.conditions()):>3} conditions  {segment.name}"
                  + (f"  (imported by {', '.join(importers)})" if importers else ""))
        if not site.segments:
            print("  (no segments yet: leadstream segments apply FILE --site SITE)")
        return 0
    for rule in site.rules:
        print(f"  rule    {rule.id:<28} v{rule.version:<4} when {rule.when.kind}: "
              f"{', '.join(action.key for action in rule.then)}")
    for segment in site.segments:
        print(f"  segment {segment.id:<28} v{segment.version:<4} of {segment.of}: {segment.name}")
    for stored in site.boards:
        stages = " -> ".join(stage.name for stage in stored.board.stages)
        source = f", import {stored.board.import_.segment}" if stored.board.import_ else ""
        print(f"  board   {stored.board.id:<28} v{stored.version:<4} {stored.board.card} cards{source}: {stages}")
    for owner in site.owners:
        print(f"  owner   {owner.id:<28} {owner.name} <{owner.email}>")
    if kind == "owners" and not site.owners:
        print("  (no owners yet: leadstream owners apply FILE --site SITE)")
    if not site.rules and not site.boards and not site.segments and not site.owners:
        print("  (no rules, segments, boards or owners yet: leadstream rules apply FILE --site SITE)")
    return 0


def replay_webhook(settings: Settings, webhook_id: str) -> int:
    try:
        outcome = asyncio.run(webhooks.replay(settings, webhook_id))
    except webhooks.UnknownWebhook:
        print(f"leadstream webhooks replay: no webhook {webhook_id!r}", file=sys.stderr)
        return 2
    print(f"webhook {webhook_id}: {outcome.replace('_', ' ')}")
    return 0


class _Discard:
    """Where a rebuild's outputs go: they are in Kafka already, from the run being replayed."""

    async def send(self, outputs) -> None:
        pass


def rebuild_boards(settings: Settings) -> int:
    """`leadstream boards rebuild`: the board state in Redis recomputed from `board.commands` in Kafka.

    For when Redis was lost or a board's state is in doubt. Stop the workers' board processor first (this
    refuses while it runs) and, if Redis was lost, re-apply the rules and boards file. Every card, column,
    live feed and command result is rebuilt by replaying the board processor's whole input through the same
    stage machine; the board versions keep growing, so no stale If-Match matches afterwards."""
    return asyncio.run(_rebuild_boards(settings))


async def _rebuild_boards(settings: Settings) -> int:
    kafka, prefix = settings.kafka(), settings.name("ls")
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        group = kafka.group(BOARD_PROCESSOR_GROUP)
        described = await admin.describe_consumer_groups([group])
        if any(g[1] == group and g[5] for response in described for g in response.groups):
            print("leadstream boards rebuild: the board processor is running (its consumer group has members);"
                  " stop the workers, or run them without it (--processors raw,lead,webhooks), first", file=sys.stderr)
            return 2
    finally:
        await admin.close()
    redis = redis_from_url(settings.redis_url)
    consumer = kafka_consumer(kafka, group=None)
    try:
        definitions, boards, keys = DefinitionsStore(redis, prefix), BoardStore(redis, prefix), RedisKeys(prefix)
        for site in await definitions.sites():
            for stored in await definitions.list_boards(site):
                await boards.clear_board(site, stored.board.id)
        for pattern in (keys.card_states_pattern(), keys.board_turns_pattern(), keys.command_results_pattern(),
                        keys.due_pattern("board")):
            async for key in redis.scan_iter(match=pattern, count=10_000):
                await redis.delete(key)
        await redis.delete(keys.watermarks("board"))
        store = RedisStateStore(redis, prefix, "board")
        tables = LookupTables()  # the company cards: an assignment by account.country reads them
        await tables.refresh(redis, prefix)
        # no webhook queue: a rebuild re-derives the moves (and their owners, from turns started afresh), it does
        # not send their stage.changed webhooks again
        board = BoardProcessor(boards, SiteDefinitionsCache(definitions), prefix, None, tables.companies,
                               settings.erasure_key)
        runner = ProcessorRunner(board, store, _Discard(), kafka.partitions, EVENTS_DLQ)
        await consumer.start()
        partitions = [TopicPartition(kafka.topic(BOARD_COMMANDS.name), p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        total, replayed = sum(ends.values()), 0
        print(f"replaying {total:,} board commands and card updates ...", flush=True)
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=settings.worker_batch_size)
            messages = [Message(m.partition, m.offset, m.key, m.value, m.headers) for tp, ms in fetched.items()
                        for m in ms if m.offset < ends[tp]]
            if messages:
                await runner.process(messages)
                replayed += len(messages)
                print(f"  {replayed:,}/{total:,}", flush=True)
        print(f"boards rebuilt from {replayed:,} records; start the board processor again to go on from there")
        return 0
    finally:
        await consumer.stop()
        await redis.aclose()


def _erasures(settings: Settings, redis):
    from api.erasure import Erasures

    return Erasures(redis, settings.name("ls"), settings.clickhouse(), settings.erasure_key)


def erase_person(settings: Settings, site: str, email: str, lead: str, wait: bool, status_of: str) -> int:
    """`leadstream erase`: erase a person (or, with --status, show an erasure's status) and print it as JSON."""
    from api.erasure import InvalidPerson

    async def run() -> int:
        redis = redis_from_url(settings.redis_url)
        try:
            erasures = _erasures(settings, redis)
            if status_of:
                job = await erasures.status(site, status_of)
                if job is None:
                    print(f"leadstream erase: no erasure {status_of!r} on site {site!r}", file=sys.stderr)
                    return 1
            else:
                try:
                    job = await erasures.erase(site, "cli", email, lead)
                except InvalidPerson as err:
                    print(f"leadstream erase: {err}", file=sys.stderr)
                    return 2
                if wait:
                    job = await erasures.wait(site, job.erasure_id)
            print(orjson.dumps(job.public(), option=orjson.OPT_INDENT_2).decode())
            return 0
        finally:
            await redis.aclose()

    return asyncio.run(run())


def export_person(settings: Settings, site: str, email: str) -> int:
    """`leadstream export-person`: everything stored on a person, as one JSON document on stdout."""
    from api.erasure import InvalidPerson

    async def run() -> int:
        redis = redis_from_url(settings.redis_url)
        try:
            try:
                doc = await _erasures(settings, redis).export(site, email)
            except InvalidPerson as err:
                print(f"leadstream export-person: {err}", file=sys.stderr)
                return 2
            print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
            return 0
        finally:
            await redis.aclose()

    return asyncio.run(run())
