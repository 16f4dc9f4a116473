"""The erasure ledger as a processor reads it: once per batch, one small read.

Each batch guards the ledger's version (`Batch.guard`): one GET, and the batch commits only if no erasure
happened meanwhile. When the version moved since this worker last looked, the ledger (a hash of erased
visitors, leads and email HMACs, schemas/erasure.py) is read again; otherwise the cached one is used. So
an erasure that lands while a worker holds a batch makes that batch's commit fail and the batch is
computed again, this time without the person: their state, written back by a batch computed before the
erasure, can never undo it.
"""

from __future__ import annotations

import logging

from processors.runtime.batch import Batch
from schemas.erasure import EMPTY, Ledger
from schemas.redis_keys import RedisKeys

log = logging.getLogger(__name__)


class LedgerView:
    """The ledger of a deployment (`prefix`), cached by its version. `key`: LEADSTREAM_ERASURE_KEY, if set;
    otherwise the generated key kept in Redis is read with the ledger."""

    def __init__(self, prefix: str, key: str = ""):
        self.keys = RedisKeys(prefix)
        self.key = key.encode()
        self._version: bytes | None = None
        self._ledger = EMPTY
        self.dropped = 0  # records dropped since start (also logged per batch)

    async def of(self, batch: Batch) -> Ledger:
        version = await batch.guard(self.keys.erasure_version)
        if version is None:
            return EMPTY
        if version != self._version:
            fields = await batch.read_hash(self.keys.erasure_ledger)
            key = self.key or await batch.guard(self.keys.erasure_key) or b""
            self._ledger, self._version = Ledger.of(fields, key), version
        return self._ledger

    def count(self, processor: str, dropped: int) -> None:
        if dropped:
            self.dropped += dropped
            log.info("%s: dropped %d records of erased people (%d since start)", processor, dropped, self.dropped)
