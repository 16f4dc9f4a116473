"""The operator-loaded tables every worker keeps in memory — the IP-range table (as a `NetworkDirectory`)
and the company cards (a `CompanyDirectory`) — and how a change reaches them within about a second.

Each table has a version key in Redis, bumped with every write. The worker's one-second timer reads both
versions in one round trip and reloads only what moved: the IP-range table whole (it is small and
changes by hand), the company cards by their changes since the version it holds. So traffic sent right
after `leadstream ip-ranges load` or `leadstream companies load` is matched to its companies.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from processors.accounts import BadLine, IpRangeTable
from processors.companies import CompanyDirectory, CompanyStore
from processors.networks import NetworkDirectory
from schemas.redis_keys import RedisKeys


async def publish_ip_ranges(redis: aioredis.Redis, prefix: str, csv_text: str) -> None:
    """Replace the IP-range table; running workers pick it up within about a second."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(RedisKeys(prefix).ip_ranges, csv_text)
        pipe.incr(RedisKeys(prefix).ip_ranges_version)
        await pipe.execute()


async def load_ip_table(redis: aioredis.Redis, prefix: str) -> tuple[IpRangeTable, list[BadLine]]:
    csv_text = await redis.get(RedisKeys(prefix).ip_ranges)
    return IpRangeTable.from_lines(csv_text.decode().splitlines() if csv_text else [])


class LookupTables:
    """What the processors read per event: `networks` (raw processor) and `companies` (raw and lead
    processors), empty until the first `refresh`. `refresh` swaps in a new `networks` whole, and updates
    `companies` in place, between look-ups (never during one: nothing awaits inside a look-up)."""

    def __init__(self) -> None:
        self.networks = NetworkDirectory()
        self.companies = CompanyDirectory()
        self.ip_ranges_version = -1

    async def refresh(self, redis: aioredis.Redis, prefix: str) -> None:
        """One round trip when nothing changed; a reload of what did."""
        company_store = CompanyStore(redis, prefix)
        raw_ip_version, raw_company_version = await redis.mget(RedisKeys(prefix).ip_ranges_version,
                                                               company_store.version_key)
        ip_version = int(raw_ip_version or 0)
        if ip_version != self.ip_ranges_version:
            table, _ = await load_ip_table(redis, prefix)
            self.networks, self.ip_ranges_version = NetworkDirectory(table), ip_version
        if int(raw_company_version or 0) != self.companies.version:
            await company_store.load_into(self.companies)
