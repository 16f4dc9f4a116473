"""The one retry loop: exponential backoff for work that must eventually go through (a batch, an insert),
and the rule that tells an outage (retry forever, nothing is lost) from poison (set the record aside).

An outage — Kafka, Redis or ClickHouse unreachable, a timeout, a lost race — says nothing about the data:
the same work is retried until it goes through. Any other failure that repeats POISON_AFTER times in a
row on the same work is taken as deterministic: the work is handed to its `isolate` path, which finds the
records that fail and dead-letters them, so one record never holds up a partition.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import clickhouse_driver.errors
import redis.exceptions
from aiokafka.errors import KafkaError, KafkaTimeoutError, ProducerClosed

POISON_AFTER = 5
"""Failures in a row (not outages) after which a batch is isolated: about 15 s of backoff."""


class RetryLater(Exception):
    """A failure that is no fault of the data (e.g. a batch computed from state another worker changed)."""


def is_transient(err: BaseException) -> bool:
    """An outage or a lost race: retried as it is, never blamed on the records."""
    if isinstance(err, (RetryLater, OSError, EOFError, TimeoutError, redis.exceptions.RedisError)):
        return True  # OSError covers refused and reset connections
    if isinstance(err, KafkaError):
        return err.retriable or isinstance(err, (KafkaTimeoutError, ProducerClosed))
    if isinstance(err, clickhouse_driver.errors.Error):
        # the server or the link failed; only a value the driver cannot encode is the row's fault
        return not isinstance(err, clickhouse_driver.errors.TypeMismatchError)
    return False


def describe(err: BaseException) -> str:
    """What a log line or a dead letter says of a failure: its kind (module-qualified unless built in, so
    `struct.error` is not just `error`) and its text, never a bare class name."""
    module, name = type(err).__module__, type(err).__qualname__
    kind = name if module == "builtins" else f"{module}.{name}"
    text = str(err).strip()
    return f"{kind}: {text}" if text else f"{kind} (no message; {err!r})"


async def retry_until_done(attempt: Callable[[], Awaitable[object]], what: str, log: logging.Logger,
                           stopping: Callable[[], bool] = lambda: False, first_delay_s: float = 0.5,
                           max_delay_s: float = 30.0,
                           isolate: Callable[[BaseException], Awaitable[object]] | None = None,
                           poison_after: int = POISON_AFTER) -> bool:
    """Run `attempt` until it succeeds (True), backing off between failures; False if `stopping()` turns
    true first — the work is then left undone for whoever runs it next (never skipped, never half-done).
    After `poison_after` failures in a row that are not transient, `isolate(last error)` runs instead of
    `attempt` (and is retried the same way) when given."""
    delay = first_delay_s
    failures = 0  # in a row, not transient
    while True:
        try:
            if isolate is not None and failures >= poison_after:
                log.error("%s failed %d times in a row (%s): isolating the records that fail", what, failures,
                          describe(last_error))
                await isolate(last_error)
            else:
                await attempt()
            return True
        except Exception as err:  # noqa: BLE001 - any failure is retried; the log says what it was
            failures = 0 if is_transient(err) else failures + 1
            last_error = err
            log.warning("%s failed (%s); retrying in %.1fs", what, describe(err), delay)
            if stopping():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
