"""Each site's rules and segments (compiled) and boards as the running processors see them.

A processor asks for the sites of a batch before computing it; a timer polls each known site's definitions
version (one cheap read) and reloads a site whose version moved. A reload replaces the site's entry
whole, between batches: a batch never sees half old, half new definitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

from processors.definitions_store import DefinitionsStore
from processors.rules import RuleSet
from processors.segments import EMPTY as NO_SEGMENTS
from processors.segments import SegmentSet
from schemas.boards import BoardDefinition, Owner


@dataclass(frozen=True)
class SiteSetup:
    version: int
    rules: RuleSet
    boards: tuple[BoardDefinition, ...]
    segments: SegmentSet = NO_SEGMENTS
    owners: tuple[Owner, ...] = ()

    def owner(self, owner_id: str) -> Owner | None:
        return next((o for o in self.owners if o.id == owner_id), None)

    def board(self, board_id: str) -> BoardDefinition | None:
        return next((b for b in self.boards if b.id == board_id), None)

    @cached_property
    def imported_segments(self) -> frozenset[str]:
        """The segments some board imports: the memberships cards hear of."""
        return frozenset(board.import_.segment for board in self.boards if board.import_ is not None)


EMPTY = SiteSetup(0, RuleSet.compile([]), ())


class SiteDefinitionsCache:
    def __init__(self, store: DefinitionsStore):
        self.store = store
        self.sites: dict[str, SiteSetup] = {}

    def __getitem__(self, site: str) -> SiteSetup:
        return self.sites.get(site, EMPTY)

    async def prepare(self, sites: Iterable[str]) -> None:
        """Load the sites this batch needs and has never seen."""
        for site in set(sites) - self.sites.keys():
            await self._load(site)

    async def catch_up(self, wanted: dict[str, int]) -> None:
        """Reload each site whose loaded definitions are older than the version a record was written for (an
        API that changed a board and then sent commands about the change), rather than wait for the timer."""
        for site, version in wanted.items():
            if self[site].version < version and await self.store.site_version(site) != self[site].version:
                await self._load(site)

    async def refresh(self) -> list[str]:
        """Reload the sites whose definitions changed; returns them."""
        changed = [site for site, setup in list(self.sites.items())
                   if await self.store.site_version(site) != setup.version]
        for site in changed:
            await self._load(site)
        return changed

    async def _load(self, site: str) -> None:
        loaded = await self.store.load(site)
        self.sites[site] = SiteSetup(loaded.version, RuleSet.compile(loaded.rules, loaded.version),
                                     tuple(stored.board for stored in loaded.boards),
                                     SegmentSet.compile(loaded.segments, loaded.version), tuple(loaded.owners))
