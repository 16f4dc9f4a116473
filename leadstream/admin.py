"""Operator commands: load the IP-range table, add accounts by hand."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from leadstream.config import Settings
from processors import webhooks
from processors.definitions_store import ApplyResult, DefinitionsStore
from processors.accounts import AccountRefused, IpRangeTable, manual_account
from processors.identity_store import publish_ip_ranges
from schemas.definitions import DefinitionsError, load_definitions
from sinks import clickhouse


def load_ip_ranges(settings: Settings, path: str) -> int:
    """Validate a `cidr,domain,company_name[,kind]` CSV and publish it to every worker (via Redis)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        print(f"leadstream ip-ranges load: cannot read {path}: {err.strerror}", file=sys.stderr)
        return 2
    return publish_ip_table(settings, text)


def publish_ip_table(settings: Settings, text: str) -> int:
    table, bad = IpRangeTable.from_lines(text.splitlines())
    for line in bad[:20]:
        print(f"  line {line.line_no}: {line.reason}: {line.text[:80]!r}")
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more bad lines")

    async def publish() -> None:
        redis = aioredis.from_url(settings.redis_url)
        try:
            await publish_ip_ranges(redis, settings.name("ls"), text)
        finally:
            await redis.aclose()

    asyncio.run(publish())
    print(f"loaded {len(table):,} ranges ({len(bad)} bad lines skipped); workers pick them up within a minute")
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
    """`leadstream rules|boards apply FILE --site S`: validate the whole file, then store it in one write.
    A file for `rules apply` may also hold boards (and the other way round): both lists are applied."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        print(f"leadstream {expect} apply: cannot read {path}: {err.strerror}", file=sys.stderr)
        return 2
    try:
        definitions = load_definitions(text, path)
    except DefinitionsError as err:
        print(f"leadstream {expect} apply: {path} refused, nothing changed:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2

    async def store() -> ApplyResult:
        redis = aioredis.from_url(settings.redis_url)
        try:
            return await DefinitionsStore(redis, settings.name("ls")).apply(site_id, definitions)
        finally:
            await redis.aclose()

    try:
        result = asyncio.run(store())
    except DefinitionsError as err:
        print(f"leadstream {expect} apply: {path} refused, nothing changed:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"site {site_id}: {len(definitions.rules)} rules, {len(definitions.boards)} boards in {path};"
          f" {len(result.changed)} new or changed (definitions version {result.site_version})")
    for entry in result.changed:
        print(f"  {entry} -> version {result.versions[entry]}")
    print("running workers pick the change up within about a second")
    return 0


def list_definitions(settings: Settings, site_id: str) -> int:
    """`leadstream rules list --site S`: every rule and board with its version."""

    async def load():
        redis = aioredis.from_url(settings.redis_url)
        try:
            return await DefinitionsStore(redis, settings.name("ls")).load(site_id)
        finally:
            await redis.aclose()

    site = asyncio.run(load())
    print(f"site {site_id}, definitions version {site.version}")
    for rule in site.rules:
        print(f"  rule  {rule.id:<28} v{rule.version:<4} when {rule.when.kind}: "
              f"{', '.join(action.key for action in rule.then)}")
    for stored in site.boards:
        stages = " -> ".join(stage.name for stage in stored.board.stages)
        print(f"  board {stored.board.id:<28} v{stored.version:<4} {stored.board.card} cards: {stages}")
    if not site.rules and not site.boards:
        print("  (no rules or boards yet: leadstream rules apply FILE --site SITE)")
    return 0


def replay_webhook(settings: Settings, webhook_id: str) -> int:
    try:
        outcome = asyncio.run(webhooks.replay(settings, webhook_id))
    except webhooks.UnknownWebhook:
        print(f"leadstream webhooks replay: no webhook {webhook_id!r}", file=sys.stderr)
        return 2
    print(f"webhook {webhook_id}: {outcome.replace('_', ' ')}")
    return 0
