"""Company cards: validating them, the worker-local directory the processors read, and their Redis home.

Cards come from a file (`leadstream companies load FILE.csv|jsonl`: bad rows are listed and skipped, the
good ones load) or from an enrichment provider (processors/company_resolver.py), and live in Redis:
- `{prefix}:companies`, a hash domain -> Company JSON;
- `{prefix}:companies:version`, bumped by every write, and `{prefix}:companies:changes`, a sorted set of
  domain -> the version that last wrote it. A writer bumps the version and writes the cards and their
  change scores in one Lua call, so a reader that saw version v and then asks for the changes after v
  never misses one.
Each processor keeps a `CompanyDirectory` in memory, loaded whole at start and then only the cards that
changed since the version it has (processors/lookup_tables.py polls it every second). Reading it is a
dict look-up: nothing on the hot path waits on Redis or on a provider.

An organisation's network names its company when the organisation's name, spelt loosely
(`organisation_key`: case, accents, punctuation and legal forms like Inc, GmbH or B.V. ignored), is the
name of exactly one card.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis

from processors.accounts import AccountRefused, BadLine, manual_account
from processors.runtime.producer import BatchProducer, Outputs
from processors.runtime.writes import Writes
from schemas.companies import COMPANY_FIELDS, Company
from schemas.events import TEXT_CONTROLS
from schemas.redis_keys import RedisKeys
from schemas.topics import COMPANIES

MAX_TEXT = {"name": 200, "industry": 100, "source": 64}
MAX_URL_CHARS = 2048
_EMPLOYEES = re.compile(r"^(\d{1,7})(?:\s*-\s*(\d{1,7})|\s*\+)?$")
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9:._-]*$")
_LEGAL_FORMS = frozenset((
    "inc", "incorporated", "ltd", "limited", "llc", "llp", "lp", "plc", "corp", "corporation", "co", "company",
    "gmbh", "mbh", "ag", "kg", "se", "sa", "sas", "sarl", "srl", "spa", "bv", "nv", "oy", "oyj", "ab", "as", "asa",
    "aps", "pty", "kk", "sl", "slu", "sro", "zoo", "group", "holding", "holdings", "the",
))  # fmt: skip
MIN_ORGANISATION_KEY = 3


def employees_lower_bound(employees: str) -> int | None:
    """'51-200' -> 51, '10001+' -> 10001, '12' -> 12, '' -> 0; None when it is no head count or range.
    Thousands separators are allowed ('1,001-5,000')."""
    text = employees.replace(",", "").replace("_", "").strip()
    if not text:
        return 0
    match = _EMPLOYEES.fullmatch(text)
    if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
        return None
    return int(match.group(1))


def _canonical_employees(employees: str) -> str:
    """One spelling of a range: '1,001 - 5,000' -> '1001-5000', '10001 +' -> '10001+'."""
    return re.sub(r"\s+", "", employees.replace(",", "").replace("_", ""))


def _url_problem(field: str, url: str) -> str:
    if len(url) > MAX_URL_CHARS:
        return f"{field} is longer than {MAX_URL_CHARS} characters"
    if not re.match(r"^https?://[^\s/$.?#][^\s]*$", url, re.IGNORECASE):
        return f"{field} {url[:80]!r} is not an http(s) URL"
    if field == "linkedin_url" and not re.match(r"^https?://([a-z]{2,3}\.)?linkedin\.com/", url, re.IGNORECASE):
        return f"linkedin_url {url[:80]!r} is not a linkedin.com URL"
    return ""


def parse_company(raw: Mapping[str, Any], default_source: str, updated_ms: int) -> Company | str:
    """A validated card, or the reason the row is refused. Unknown keys are refused (a typo must not drop a
    column silently); the domain is normalised like every account domain."""
    unknown = sorted(set(raw) - set(COMPANY_FIELDS) - {"employees_min", "updated_ms"})
    if unknown:
        return f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(COMPANY_FIELDS)}"
    values: dict[str, str] = {}
    for field in COMPANY_FIELDS:
        value = raw.get(field, "")
        if value is None:
            value = ""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return f"{field} must be text"
        value = str(value).strip()
        if TEXT_CONTROLS.search(value):
            return f"{field} contains control characters"
        if len(value) > MAX_TEXT.get(field, MAX_URL_CHARS):
            return f"{field} is longer than {MAX_TEXT.get(field, MAX_URL_CHARS)} characters"
        values[field] = value
    try:
        domain = manual_account(values["domain"]).domain if values["domain"] else ""
    except AccountRefused as refused:
        return f"domain {values['domain']!r} refused: {refused}"
    if not domain:
        return "domain is missing"
    if not values["name"]:
        return "name is missing"
    employees_min = employees_lower_bound(values["employees"])
    if employees_min is None:
        return f"employees {values['employees']!r} is not a head count or range like 51-200 or 10001+"
    country = values["country"].upper()
    if country and not (len(country) == 2 and country.isascii() and country.isalpha()):
        return f"country {values['country']!r} is not an ISO 3166-1 alpha-2 code"
    for field in ("website", "linkedin_url", "logo_url"):
        problem = _url_problem(field, values[field]) if values[field] else ""
        if problem:
            return problem
    source = values["source"].lower() or default_source
    if not _SOURCE.match(source):
        return f"source {values['source']!r} must be lower-case letters, digits and : . _ -"
    return Company(domain, values["name"], values["industry"], _canonical_employees(values["employees"]),
                   employees_min, country, values["website"], values["linkedin_url"], values["logo_url"], source,
                   updated_ms)


def read_company_file(text: str, jsonl: bool, updated_ms: int, source: str = "file"
                      ) -> tuple[list[Company], list[BadLine]]:
    """The cards of a CSV (a header row naming the columns, `domain` and `name` among them) or JSON Lines
    file, and its bad rows with their line numbers. A domain given twice keeps its first row."""
    rows: list[tuple[int, str, Mapping[str, Any] | str]] = []
    if jsonl:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as error:
                rows.append((line_no, line, f"not JSON: {error}"))
                continue
            rows.append((line_no, line, row if isinstance(row, dict) else "not a JSON object"))
    else:
        reader = csv.reader(io.StringIO(text))
        header = [cell.strip().lower() for cell in next(reader, [])]
        for cells in reader:
            line = ",".join(cells)
            if not line.strip():
                continue
            if len(cells) != len(header):
                rows.append((reader.line_num, line, f"expected {len(header)} columns, got {len(cells)}"))
            else:
                rows.append((reader.line_num, line, dict(zip(header, cells))))
    companies: dict[str, tuple[int, Company]] = {}
    bad: list[BadLine] = []
    for line_no, line, row in rows:
        parsed = parse_company(row, source, updated_ms) if not isinstance(row, str) else row
        if isinstance(parsed, str):
            bad.append(BadLine(line_no, line, parsed))
        elif parsed.domain in companies:
            bad.append(BadLine(line_no, line, f"duplicate domain {parsed.domain}, first on line "
                                              f"{companies[parsed.domain][0]}"))
        else:
            companies[parsed.domain] = (line_no, parsed)
    return [company for _, company in companies.values()], bad


def organisation_key(name: str) -> str:
    """A company or network organisation's name, spelt loosely: 'ACME-ROBOTICS', 'Acme Robotics, Inc.' and
    'Ácme Robotics GmbH' are all 'acmerobotics'."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    words = re.sub(r"[^a-z0-9]+", " ", folded.replace(".", "")).split()
    while len(words) > 1 and words[-1] in _LEGAL_FORMS:
        words.pop()
    return "".join(words)


class CompanyDirectory:
    """The company cards one process holds: by domain, and by organisation name (a name shared by two
    cards names neither). Changed only between look-ups, by `apply`."""

    def __init__(self, companies: Iterable[Company] = ()) -> None:
        self.by_domain: dict[str, Company] = {}
        self._domains_by_key: dict[str, set[str]] = defaultdict(set)
        self.version = 0
        self.apply(companies)

    def __len__(self) -> int:
        return len(self.by_domain)

    def get(self, domain: str) -> Company | None:
        return self.by_domain.get(domain)

    def domain_for_org(self, org: str) -> str:
        key = organisation_key(org)
        domains = self._domains_by_key.get(key, ()) if len(key) >= MIN_ORGANISATION_KEY else ()
        return next(iter(domains)) if len(domains) == 1 else ""

    def apply(self, companies: Iterable[Company]) -> None:
        for company in companies:
            old = self.by_domain.get(company.domain)
            if old is not None:
                self._domains_by_key[organisation_key(old.name)].discard(company.domain)
            self.by_domain[company.domain] = company
            self._domains_by_key[organisation_key(company.name)].add(company.domain)


_PUBLISH = """
local version = redis.call('INCR', KEYS[3])
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], version, ARGV[i])
end
return version
"""
PUBLISH_CHUNK = 1000


class CompanyStore:
    """The cards in Redis (see the module docstring), and the queue of domains waiting for a provider."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        keys = RedisKeys(prefix)
        self.cards_key = keys.companies
        self.changes_key = keys.companies_changes
        self.version_key = keys.companies_version
        self.wanted_key = keys.companies_wanted
        self.miss_key = keys.company_miss

    async def publish(self, companies: list[Company]) -> int:
        """Write cards (in chunks of PUBLISH_CHUNK, each one atomic with its version); returns the version."""
        version = 0
        for start in range(0, len(companies), PUBLISH_CHUNK):
            args: list[str | bytes] = []
            for company in companies[start:start + PUBLISH_CHUNK]:
                args += [company.domain, company.to_json()]
            version = int(await self.redis.eval(_PUBLISH, 3, self.cards_key, self.changes_key, self.version_key,
                                                *args))
        return version

    async def version(self) -> int:
        return int(await self.redis.get(self.version_key) or 0)

    async def get_many(self, domains: list[str]) -> dict[str, Company]:
        if not domains:
            return {}
        blobs = await self.redis.hmget(self.cards_key, domains)
        return {domain: Company.from_json(blob) for domain, blob in zip(domains, blobs) if blob}

    async def load_into(self, directory: CompanyDirectory) -> None:
        """Bring a directory up to date: every card at first (version 0), then only the changed ones."""
        version = await self.version()
        if version == directory.version:
            return
        if directory.version == 0:
            cards = [Company.from_json(blob) for blob in (await self.redis.hgetall(self.cards_key)).values()]
        else:
            changed = await self.redis.zrangebyscore(self.changes_key, f"({directory.version}", "+inf")
            cards = list((await self.get_many([d.decode() for d in changed])).values())
        directory.apply(cards)
        directory.version = version


async def publish_cards(companies: list[Company], store: CompanyStore, producer: BatchProducer, partitions: int) -> int:
    """Publish cards everywhere they live: the `companies` topic (ClickHouse's copy), then Redis (the
    processors' and the API's). Returns the Redis version. A crash in between leaves ClickHouse ahead;
    publishing the same cards again is harmless."""
    outputs = Outputs(partitions)
    for company in companies:
        outputs.add(COMPANIES, company.domain.encode(), company.to_json())
    await producer.send(outputs)
    return await store.publish(companies)


def queue_wanted(writes: Writes, prefix: str, domains: Iterable[str], now_ms: int) -> None:
    """Ask the provider about these domains (the queue: domain -> when it is due), in a caller's commit (a
    processor's batch; a Redis pipeline through `RedisWrites`). A queued one keeps its place."""
    wanted = {domain: now_ms for domain in domains}
    if wanted:
        writes.zset_add(RedisKeys(prefix).companies_wanted, wanted, only_new=True)
