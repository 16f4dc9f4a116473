"""The one retry loop: exponential backoff for work that must eventually go through (a batch, an insert)."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable


async def retry_until_done(attempt: Callable[[], Awaitable[object]], what: str, log: logging.Logger,
                           stopping: Callable[[], bool] = lambda: False, first_delay_s: float = 0.5,
                           max_delay_s: float = 30.0, on_failure: Callable[[], None] = lambda: None) -> bool:
    """Run `attempt` until it succeeds (True), backing off between failures; False if `stopping()` turns
    true first — the work is then left undone for whoever runs it next (never skipped, never half-done)."""
    delay = first_delay_s
    while True:
        try:
            await attempt()
            return True
        except Exception as err:  # noqa: BLE001 - any failure is retried; the log says what it was
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(err).__name__, err, delay)
            on_failure()
            if stopping():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
