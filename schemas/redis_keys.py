"""The Redis key layouts: every key LeadStream reads or writes, spelled once (the Redis analogue of topics.py).

Processors, the API and the operator tools take their keys from here, so a layout cannot drift between a
writer and a reader. Every key starts with the deployment's prefix (`settings.name("ls")`: the topic prefix
then "ls"), so two pipelines or two tests share one Redis without meeting. Ids inside a key are joined with
\\x1f, which input validation keeps out of every id; every key that holds a site's data names the site, so
nothing of one site is reachable under another's.

Existing data lives under these exact bytes: extend the layouts, never respell one.

  {prefix}:v:{site}\\x1f{visitor}                   string  sessionizer state of a visitor (raw processor)
  {prefix}:id:v:{site}\\x1f{visitor}                string  the visitor's lead link (identity graph)
  {prefix}:id:l:{site}\\x1f{lead}                   string  a lead record (identity graph)
  {prefix}:lead:{site}\\x1f{lead}                   string  rule and segment state of a lead (lead processor)
  {prefix}:account:{site}\\x1f{domain}              string  segment state of an account (account processor)
  {prefix}:board-card:{site}\\x1f{card}             string  state of a card (board processor)
  {prefix}:board-turns:{site}\\x1f{board}\\x1f{partition}  string  round-robin turns of a board's stages (board processor)
  {prefix}:board:{site}\\x1f{board}:cards           hash    card_id -> CardView JSON
  {prefix}:board:{site}\\x1f{board}:notes           hash    card_id -> JSON list of the latest CardNotes
  {prefix}:board:{site}\\x1f{board}:col:{stage}     zset    card_id scored by entered_stage_ms
  {prefix}:board:{site}\\x1f{board}:feed            stream  the board's live feed
  {prefix}:board:{site}\\x1f{board}:version         int     the board's version (its ETag)
  {prefix}:board-result:{site}\\x1f{command}        string  a board command's result
  {prefix}:defs:site:{site}                        hash    a site's rules and boards (definitions store)
  {prefix}:defs:sites                              set     the sites that have definitions
  {prefix}:segments:backfill:since                 hash    site -> its segments before the first edit not yet backfilled
  {prefix}:segments:backfill:wanted                hash    site -> the definitions version its backfill must reach
  {prefix}:segments:backfill:done                  hash    site -> the last finished backfill (version, leads, time)
  {prefix}:ip-ranges                               string  the IP-range table (CSV)
  {prefix}:ip-ranges:version                       int     bumped by every load of the table
  {prefix}:companies                               hash    domain -> company card JSON
  {prefix}:companies:version                       int     bumped by every write of cards
  {prefix}:companies:changes                       zset    domain -> the version that last wrote it
  {prefix}:companies:wanted                        zset    domain -> when the enrichment provider is asked
  {prefix}:companies:miss:{domain}                 string  the provider knew nothing (or failed), for a while
  {prefix}:{namespace}wm                           hash    a processor's watermarks: partition -> applied
                                                           offset, st:{partition} -> stream time
  {prefix}:{namespace}due:{partition}              zset    a processor's timer index: key -> deadline
  {prefix}:{lock}, {prefix}:{lock}:fence           string  a store lock and its fencing counter
  {prefix}:id:lock:{site}\\x1f                    string  a site's identity-graph lock (a store lock)
  {prefix}:cost:{worker}                           string  a worker's CPU meter snapshot
  {prefix}:erasure:ledger                          hash    erased visitors, leads and email HMACs -> erasure id
  {prefix}:erasure:version                         int     bumped by every erasure (a batch precondition)
  {prefix}:erasure:key                             string  the generated HMAC key of the ledger's emails
  {prefix}:erasure:job:{id}                        string  an erasure's status and counts (no personal data)
  {prefix}:wh:req | wh:due | wh:lease | wh:finished | wh:log | wh:log-turn   the webhook queue and its log (processors/webhooks.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

SEP = "\x1f"
"""Joins the ids inside a key: validation rejects control characters in every id, so keys never collide."""

PROCESSOR_NAMESPACES = {"raw": "", "lead": "lead:", "board": "board:", "account": "account:"}
"""Each processor's watermarks and timer index live under a namespace of its own. The raw processor's is
empty: it had its keys before there was a second processor."""

IDENTITY_LOCK = "id:lock"
"""The identity graph's locks' namespace: each site's graph has a lock of its own, `identity_lock(site)`
(one worker at a time resolves one site's identities; see processors/identity_store.py)."""


def identity_lock(site_id: str) -> str:
    """The lock of one site's identity graph: `{prefix}:id:lock:{site}\\x1f` (and its fencing counter
    `...\\x1f:fence`). The separator closes the site id, so no site's lock is another site's counter."""
    return f"{IDENTITY_LOCK}:{site_id}{SEP}"

BACKFILL_LOCK = "segments:backfill:lock"
"""The segment backfill job's lock (one job at a time; see sinks/segment_backfill.py)."""


class _Named(Protocol):
    def name(self, base: str) -> str: ...


def glob_escape(text: str) -> str:
    """`text` as a literal inside a SCAN pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str

    @classmethod
    def of(cls, settings: _Named) -> RedisKeys:
        """The keys of a deployment (or of a test's or a benchmark's namespace)."""
        return cls(settings.name("ls"))

    # -- raw processor: sessionizer state and the identity graph --------------------------------------

    def visitor_state(self, site_id: str, visitor_id: str) -> str:
        return f"{self.prefix}:v:{site_id}{SEP}{visitor_id}"

    def visitor_states_pattern(self) -> str:
        return f"{glob_escape(self.prefix)}:v:*"

    def identity_visitor(self, site_id: str, visitor_id: str) -> str:
        return f"{self.prefix}:id:v:{site_id}{SEP}{visitor_id}"

    def identity_lead(self, site_id: str, lead_id: str) -> str:
        return f"{self.prefix}:id:l:{site_id}{SEP}{lead_id}"

    # -- lead processor --------------------------------------------------------------------------------

    def lead_state(self, site_id: str, lead_id: str) -> str:
        return f"{self.prefix}:lead:{site_id}{SEP}{lead_id}"

    # -- account processor -----------------------------------------------------------------------------

    def account_state(self, site_id: str, domain: str) -> str:
        return f"{self.prefix}:account:{site_id}{SEP}{domain}"

    # -- board processor and the board API -------------------------------------------------------------

    def card_state(self, site_id: str, card_id: str) -> str:
        return f"{self.prefix}:board-card:{site_id}{SEP}{card_id}"

    def card_states_pattern(self) -> str:
        return f"{glob_escape(self.prefix)}:board-card:*"

    def board_turns(self, site_id: str, board_id: str, partition: int) -> str:
        """The board processor's round-robin turns of one board's stages, for one input partition (JSON
        stage id -> assignments made; processors/handover.py)."""
        return f"{self.prefix}:board-turns:{site_id}{SEP}{board_id}{SEP}{partition}"

    def board_turns_pattern(self) -> str:
        return f"{glob_escape(self.prefix)}:board-turns:*"

    def _board(self, site_id: str, board_id: str, part: str) -> str:
        return f"{self.prefix}:board:{site_id}{SEP}{board_id}:{part}"

    def board_cards(self, site_id: str, board_id: str) -> str:
        return self._board(site_id, board_id, "cards")

    def board_notes(self, site_id: str, board_id: str) -> str:
        return self._board(site_id, board_id, "notes")

    def board_column(self, site_id: str, board_id: str, stage_id: str) -> str:
        return self._board(site_id, board_id, f"col:{stage_id}")

    def board_columns_pattern(self, site_id: str, board_id: str) -> str:
        """Every column of a board, also of stages its definition no longer has."""
        return glob_escape(self._board(site_id, board_id, "col:")) + "*"

    def board_feed(self, site_id: str, board_id: str) -> str:
        return self._board(site_id, board_id, "feed")

    def board_version(self, site_id: str, board_id: str) -> str:
        return self._board(site_id, board_id, "version")

    def command_result(self, site_id: str, command_id: str) -> str:
        return f"{self.prefix}:board-result:{site_id}{SEP}{command_id}"

    def command_results_pattern(self) -> str:
        return f"{glob_escape(self.prefix)}:board-result:*"

    # -- definitions and lookup tables -----------------------------------------------------------------

    def site_definitions(self, site_id: str) -> str:
        return f"{self.prefix}:defs:site:{site_id}"

    @property
    def definitions_sites(self) -> str:
        return f"{self.prefix}:defs:sites"

    @property
    def backfill_since(self) -> str:
        return f"{self.prefix}:segments:backfill:since"

    @property
    def backfill_wanted(self) -> str:
        return f"{self.prefix}:segments:backfill:wanted"

    @property
    def backfill_done(self) -> str:
        return f"{self.prefix}:segments:backfill:done"

    @property
    def ip_ranges(self) -> str:
        return f"{self.prefix}:ip-ranges"

    @property
    def ip_ranges_version(self) -> str:
        return f"{self.prefix}:ip-ranges:version"

    @property
    def companies(self) -> str:
        return f"{self.prefix}:companies"

    @property
    def companies_version(self) -> str:
        return f"{self.prefix}:companies:version"

    @property
    def companies_changes(self) -> str:
        return f"{self.prefix}:companies:changes"

    @property
    def companies_wanted(self) -> str:
        return f"{self.prefix}:companies:wanted"

    def company_miss(self, domain: str) -> str:
        return f"{self.prefix}:companies:miss:{domain}"

    # -- the processor runtime -------------------------------------------------------------------------

    def watermarks(self, processor: str) -> str:
        return f"{self.prefix}:{PROCESSOR_NAMESPACES[processor]}wm"

    def due(self, processor: str, partition: int) -> str:
        return f"{self.prefix}:{PROCESSOR_NAMESPACES[processor]}due:{partition}"

    def due_pattern(self, processor: str) -> str:
        return f"{glob_escape(self.prefix)}:{PROCESSOR_NAMESPACES[processor]}due:*"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def lock_fence(self, name: str) -> str:
        return f"{self.lock(name)}:fence"

    def cost(self, worker_name: str) -> str:
        return f"{self.prefix}:cost:{worker_name}"

    @property
    def server_secret(self) -> str:
        """The API's generated server secret, when LEADSTREAM_SERVER_SECRET is not set (one for every API process)."""
        return f"{self.prefix}:api:server-secret"

    # -- erasure (schemas/erasure.py) -------------------------------------------------------------------

    @property
    def erasure_ledger(self) -> str:
        return f"{self.prefix}:erasure:ledger"

    @property
    def erasure_version(self) -> str:
        return f"{self.prefix}:erasure:version"

    @property
    def erasure_key(self) -> str:
        """The ledger's HMAC key, when LEADSTREAM_ERASURE_KEY is not set (generated once, like the server secret)."""
        return f"{self.prefix}:erasure:key"

    def erasure_job(self, erasure_id: str) -> str:
        return f"{self.prefix}:erasure:job:{erasure_id}"

    # -- the webhook queue -----------------------------------------------------------------------------

    @property
    def webhook_requests(self) -> str:
        return f"{self.prefix}:wh:req"

    @property
    def webhook_due(self) -> str:
        return f"{self.prefix}:wh:due"

    @property
    def webhook_leases(self) -> str:
        return f"{self.prefix}:wh:lease"

    @property
    def webhook_finished(self) -> str:
        return f"{self.prefix}:wh:finished"

    @property
    def webhook_log(self) -> str:
        """A stream of delivery-log rows waiting to be produced to webhooks.deliveries."""
        return f"{self.prefix}:wh:log"

    @property
    def webhook_log_turn(self) -> str:
        """The short-lived turn of the one dispatcher that moves log rows to Kafka."""
        return f"{self.prefix}:wh:log-turn"
