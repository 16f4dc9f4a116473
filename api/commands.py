"""People's writes to a board: commands on `board.commands`, and their outcomes.

Writes never touch board state here: a write becomes one `BoardCommand` on `board.commands` (keyed by card,
so one card's commands keep their order), and the board processor decides it with the same pure stage machine
as every automatic move and stores the outcome under the command id. The API then waits a few seconds for the
outcome: 200 with it, or 202 with the command id to look it up later.

The command id is derived from (site, board, card, Idempotency-Key): a retried request re-derives the same
id, which the board processor applies once.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import Response
from pydantic import BaseModel

from api.keys import SiteGrant
from api.problems import Problem, unavailable
from processors.board_store import BoardStore
from processors.boards import (
    ARCHIVED,
    CARD_MERGED,
    EMPTY_NOTE,
    NOT_ON_BOARD,
    STAGE_REGRESSION,
    UNKNOWN_BOARD,
    UNKNOWN_STAGE,
    WRONG_CARD_KIND,
)
from processors.runtime.producer import BatchProducer, Outputs
from schemas.boards import BoardCommand, BoardDefinition, CardView, CommandResult
from schemas.settings import Settings
from schemas.rules import TagByHand
from schemas.topics import BOARD_COMMANDS, EVENTS_DLQ, LEADS_ACTIVITY

COMMAND_WAIT_S = 5.0
COMMAND_POLL_S = 0.05
SEND_CHUNK = 1_000  # commands per produce request when a board edit moves many cards

STALE_VERSION = "stale_version"  # If-Match is not the board's version (the API's 412; the board processor re-checks)

# How a refusal (the stage machine's code, stored by the board processor in CommandResult.code) answers over HTTP.
REFUSAL_STATUS = {
    STAGE_REGRESSION: 409, CARD_MERGED: 409, ARCHIVED: 409,
    UNKNOWN_STAGE: 422, WRONG_CARD_KIND: 422, EMPTY_NOTE: 422,
    UNKNOWN_BOARD: 404, NOT_ON_BOARD: 404,
    STALE_VERSION: 412,
}


class CommandOutcome(BaseModel):
    command_id: str
    status: Literal["applied", "pending"]
    result: CommandResult | None = None
    card: CardView | None = None


def command_id_for(site_id: str, board_id: str, card_id: str, idempotency_key: str | None) -> str:
    """Deterministic for a retried request (same Idempotency-Key), random without one."""
    if not idempotency_key:
        return "cmd_" + uuid.uuid4().hex
    text = "\x1f".join((site_id, board_id, card_id, idempotency_key))
    return "cmd_" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def person_command(grant: SiteGrant, board_id: str, card_id: str, kind: str, idempotency_key: str | None,
                   **fields: Any) -> BoardCommand:
    """A command sent by the holder of `grant` (recorded as its actor, which names the key by its id only)."""
    return BoardCommand(command_id=command_id_for(grant.site, board_id, card_id, idempotency_key),
                        site_id=grant.site, board_id=board_id, card_id=card_id, kind=kind,  # type: ignore[arg-type]
                        actor=grant.actor, ts_ms=now_ms(), **fields)


def etag(version: int) -> str:
    return f'"{version}"'


class CommandBus:
    """Sends commands to `board.commands` and waits for their outcomes in the board store. The producer starts
    on first use, so the read API runs without Kafka."""

    def __init__(self, settings: Settings, boards: BoardStore) -> None:
        self.partitions = settings.partitions
        self.prefix = settings.name("ls")
        self.boards = boards
        self.producer = BatchProducer(settings.kafka(), EVENTS_DLQ)
        self._started = False
        self._lock = asyncio.Lock()

    async def stop(self) -> None:
        if self._started:
            await self.producer.stop()

    async def send(self, commands: Iterable[BoardCommand]) -> None:
        outputs = Outputs(self.partitions)
        for command in commands:
            outputs.add(BOARD_COMMANDS, command.card_id.encode(), command.to_json(), record_type=BoardCommand)
        await self._produce(outputs)

    async def send_lead_record(self, record: TagByHand) -> None:
        """A person's change of a lead (a tag by hand) for the lead processor, on `leads.activity` keyed by
        the lead (so it keeps its order with the lead's events)."""
        outputs = Outputs(self.partitions)
        outputs.add(LEADS_ACTIVITY, record.lead_id.encode(), record.to_json(), record_type=TagByHand)
        await self._produce(outputs)

    async def _produce(self, outputs: Outputs) -> None:
        try:
            async with self._lock:
                if not self._started:
                    await self.producer.start()
                    self._started = True
            await self.producer.send(outputs)
        except Exception as err:  # noqa: BLE001 - any broker error is an outage to the caller
            raise unavailable("command bus unavailable", err) from err

    async def wait_for_result(self, site_id: str, command_id: str) -> CommandResult | None:
        deadline = time.monotonic() + COMMAND_WAIT_S
        while True:
            result = await self.boards.command_result(site_id, command_id)
            if result is not None or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(COMMAND_POLL_S)

    async def run(self, command: BoardCommand, response: Response) -> CommandOutcome:
        """Send (unless a retry finds it applied), wait for the outcome, answer it: 200 applied, 202 pending
        (with a Location to poll), or the refusal's status and code."""
        result = await self.boards.command_result(command.site_id, command.command_id)
        if result is None:
            await self.send([command])
            result = await self.wait_for_result(command.site_id, command.command_id)
        response.headers["ETag"] = etag(await self.boards.version(command.site_id, command.board_id))
        if result is None:
            response.status_code = 202
            response.headers["Location"] = (f"/v1/sites/{command.site_id}/boards/{command.board_id}"
                                            f"/commands/{command.command_id}")
            return CommandOutcome(command_id=command.command_id, status="pending")
        if not result.ok:
            raise Problem(REFUSAL_STATUS.get(result.code, 409), f"{command.kind} refused", result.message,
                          result.code, command_id=command.command_id)
        card = await self.boards.card(command.site_id, command.board_id, command.card_id)
        return CommandOutcome(command_id=command.command_id, status="applied", result=result, card=card)

    async def move_out_of_deleted_stages(self, site_id: str, actor: str, before: BoardDefinition,
                                         after: BoardDefinition, definitions_version: int) -> int:
        """After `actor` edited a board (`before` -> `after`, written at the site's `definitions_version`),
        one `stage_deleted` command for every card in a stage the edit deleted: the board processor moves each
        to the nearest kept stage on its left (processors.boards.delete_stage), with one stage change. Returns
        how many were sent. Their ids derive from the edit, so sending them again changes nothing."""
        kept = {stage.id for stage in after.stages}
        board_before = before.model_dump_json(exclude_unset=True)
        sent, chunk = 0, []
        for stage in (s.id for s in before.stages if s.id not in kept):
            async for card_id in self.boards.column_card_ids(site_id, before.id, stage):
                chunk.append(BoardCommand(
                    command_id=command_id_for(site_id, before.id, card_id, f"stage_deleted@{definitions_version}"),
                    site_id=site_id, board_id=before.id, card_id=card_id, kind="stage_deleted", actor=actor,
                    ts_ms=now_ms(), board_before=board_before, definitions_version=definitions_version))
                if len(chunk) == SEND_CHUNK:
                    await self.send(chunk)
                    sent, chunk = sent + len(chunk), []
        if chunk:
            await self.send(chunk)
        return sent + len(chunk)
