"""The account processor: account segments on `segments.account-leads`, one account at a time, in each
account's order.

A thin adapter around the pure core's account part (processors/segments.py, `on_lead_facts`) on the shared
`ProcessorRunner`. Its input is what the lead processor tells an account of one of its leads (which lead
filters of account segments the lead meets, or that it left the account), keyed by the account's domain;
declared state: one `AccountState` per account (`accounts`), committed with the partition's watermark; no
timers (a lead filter's windows are evaluated on its lead, by the lead processor's hourly pass).
Outputs: the account's entries and exits on `segments.changes` (keyed by domain), and, for the account
segments some board imports, the account card's memberships on `board.commands` (`CardUpdate` kind
`segment`): when they change, and once per definitions version when a backfill refreshes the account (the
import step: a board created after its members exist still gets their cards).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from processors.erasure_ledger import LedgerView
from processors.runtime.batch import Batch
from processors.runtime.ingest import Message
from processors.runtime.runner import decode_batch
from processors.runtime.state import StateSpec
from processors.segments import AccountState, on_lead_facts
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from schemas.boards import CardUpdate, account_card_id
from schemas.companies import NO_COMPANIES, CompanyCards
from schemas.records import digest
from schemas.redis_keys import RedisKeys
from schemas.segments import AccountLeadFacts
from schemas.topics import BOARD_COMMANDS, SEGMENTS_ACCOUNT_LEADS, SEGMENTS_CHANGES

def account_spec(prefix: str) -> StateSpec[AccountState]:
    return StateSpec("account", RedisKeys(prefix).account_state, AccountState.to_json, AccountState.from_json)


class AccountProcessor:
    name = "account"
    timers = None  # account segments have no windows of their own

    def __init__(self, sites: SiteDefinitionsCache, prefix: str, companies: CompanyCards = NO_COMPANIES,
                 erasure_key: str = ""):
        self.ledger = LedgerView(prefix, erasure_key)
        self.sites = sites
        self.companies = companies  # what `account.*` conditions read (updated in place by the worker)
        self.accounts = account_spec(prefix)

    async def step(self, batch: Batch, messages: Sequence[Message]) -> None:
        updates: list[tuple[int, AccountLeadFacts]] = decode_batch(messages, SEGMENTS_ACCOUNT_LEADS, self.name)
        await self.sites.prepare(update.site_id for _, update in updates)
        ledger = await self.ledger.of(batch)
        if ledger:  # an erased lead's update only takes it out of its account (never adds it back)
            erased = [i for i, (_, u) in enumerate(updates) if ledger.drops(u.site_id, lead_id=u.lead_id)]
            for i in erased:
                p, u = updates[i]
                updates[i] = (p, replace(u, left=True, filters=[]))
            self.ledger.count(self.name, len(erased))
        wanted: dict[str, int] = {}  # filters evaluated with newer definitions: this worker catches up first
        for _, update in updates:
            wanted[update.site_id] = max(wanted.get(update.site_id, 0), update.version)
        await self.sites.catch_up(wanted)
        keys = {self.accounts.key(u.site_id, u.account_domain): (p, u.site_id, u.account_domain) for p, u in updates}
        await batch.load((self.accounts, {key: partition for key, (partition, _, _) in keys.items()}))
        accounts = {key: batch.get(self.accounts, key) or AccountState(site, domain)
                    for key, (_, site, domain) in keys.items()}
        for _, update in updates:
            key = self.accounts.key(update.site_id, update.account_domain)
            accounts[key] = self._apply(accounts[key], update, batch)
        for key, account in accounts.items():
            batch.put(self.accounts, key, account)

    def _apply(self, account: AccountState, update: AccountLeadFacts, batch: Batch) -> AccountState:
        setup = self.sites[update.site_id]
        new, changes = on_lead_facts(setup.segments, account, update, self.companies)
        if new is account:
            return account  # had it already
        for change in changes:
            batch.outputs.add(SEGMENTS_CHANGES, change.member_id.encode(), change.to_json())
        members = _imported(new, setup)
        refreshing = update.refresh and new.told_version < update.version and _imports_accounts(setup)
        if refreshing or members != _imported(account, setup):
            if refreshing:
                new.told_version = update.version
            card_id = account_card_id(new.domain)
            card = CardUpdate("cu_" + digest(card_id, update.update_id, "segment"), new.site_id, card_id, "segment",
                              "import" if update.refresh else "system", segments=members, ts_ms=update.ts_ms,
                              definitions_version=setup.version)
            batch.outputs.add(BOARD_COMMANDS, card_id.encode(), card.to_json(), record_type=CardUpdate)
        return new


def _imported(account: AccountState, setup: SiteSetup) -> list[str]:
    """The account's memberships of the segments some board of its site imports."""
    return [segment for segment in account.member_of() if segment in setup.imported_segments]


def _imports_accounts(setup: SiteSetup) -> bool:
    """Whether some board of the site imports an account segment (only then do account cards hear of them)."""
    return any(compiled.segment_id in setup.imported_segments for compiled in setup.segments.account)
