"""The API's ClickHouse reads: bounded, off the event loop, and an outage is a 503.

Every query the API sends carries `max_execution_time` and `max_memory_usage` (settings
`api_query_max_seconds`, `api_query_max_memory_bytes`), so one request for a huge account or site cannot hold
the server: ClickHouse cancels it and the caller gets a 503 naming the limit. The driver blocks, so reads run
in the thread pool, never on the event loop the live streams share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from clickhouse_driver.errors import ErrorCodes, ServerException
from starlette.concurrency import run_in_threadpool

from api.lead_profile import QueryClient
from api.problems import Problem, unavailable
from schemas.settings import Settings
from sinks import clickhouse

T = TypeVar("T")
OVER_LIMITS = (ErrorCodes.TIMEOUT_EXCEEDED, ErrorCodes.MEMORY_LIMIT_EXCEEDED, ErrorCodes.TOO_SLOW)


class _BoundedClient:
    """A driver client whose every query carries the API's limits (the read models see a QueryClient)."""

    def __init__(self, client, limits: dict[str, int]) -> None:
        self.client, self.limits = client, limits

    def execute(self, query: str, params: dict | None = None, external_tables: list[dict] | None = None) -> list:
        return self.client.execute(query, params, external_tables=external_tables, settings=self.limits)


class Analytics:
    def __init__(self, settings: Settings) -> None:
        self.pool = clickhouse.ClientPool(settings.clickhouse())
        self.limits = {"max_execution_time": settings.api_query_max_seconds,
                       "max_memory_usage": settings.api_query_max_memory_bytes}

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(client, *args, **kwargs)` in the thread pool; a driver or network error is a 503."""
        return await run_in_threadpool(self._read, fn, *args, **kwargs)

    def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            with self.pool.client() as client:
                bounded: QueryClient = _BoundedClient(client, self.limits)
                return fn(bounded, *args, **kwargs)
        except Problem:
            raise
        except ServerException as err:
            if err.code in OVER_LIMITS:
                raise unavailable("analytics query over its limits", err) from err
            raise unavailable("analytics store unavailable", err) from err
        except Exception as err:  # noqa: BLE001 - any driver or network error is an outage to the caller
            raise unavailable("analytics store unavailable", err) from err
