"""Operator commands: load the IP-range table, add accounts by hand."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from leadstream.config import Settings
from processors.accounts import AccountRefused, IpRangeTable, manual_account
from processors.identity_store import publish_ip_ranges
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
