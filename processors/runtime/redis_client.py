"""The asyncio Redis client every LeadStream process uses: redis-py, with commands packed in C by hiredis.

redis-py's asyncio connection packs each command in Python (about 200 µs for an MGET of 200 keys, 45 µs with
`hiredis.pack_command`); the packing was the raw processor's largest single cost after enrichment. Replies
are already parsed by hiredis when it is installed. Everything else (pools, TLS, Unix sockets, retries)
is redis-py's own: only `pack_command` changes, and it gives the same bytes.
"""

from __future__ import annotations

from urllib.parse import urlparse

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import (BlockingConnectionPool, Connection, ConnectionPool, SSLConnection,
                                      UnixDomainSocketConnection, parse_url)


class _PackedByHiredis:
    def pack_command(self, *args) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # e.g. "CONFIG GET": the server wants separate words
            args = (*args[0].encode().split(), *args[1:])
        elif isinstance(args[0], bytes) and b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class PackedConnection(_PackedByHiredis, Connection):
    pass


class PackedSSLConnection(_PackedByHiredis, SSLConnection):
    pass


class PackedUnixConnection(_PackedByHiredis, UnixDomainSocketConnection):
    pass


_BY_SCHEME = {"redis": PackedConnection, "rediss": PackedSSLConnection, "unix": PackedUnixConnection}


def connection_class(url: str) -> type[Connection]:
    """The connection class for a Redis URL's scheme (redis://, rediss:// or unix://)."""
    scheme = urlparse(url).scheme
    if scheme not in _BY_SCHEME:
        raise ValueError(f"unsupported Redis URL scheme {scheme!r} in {url!r}: use redis://, rediss:// or unix://")
    return _BY_SCHEME[scheme]


def _pool(pool_class: type[ConnectionPool], url: str, options: dict) -> ConnectionPool:
    # as redis-py's `from_url`, except that the URL's scheme picks the packed twin of its connection class
    return pool_class(**{**options, **parse_url(url), "connection_class": connection_class(url)})


def redis_from_url(url: str, **options) -> aioredis.Redis:
    """An asyncio client for `url`, as `redis.asyncio.from_url` makes it (same options; closing the client
    closes its pool)."""
    return aioredis.Redis.from_pool(_pool(ConnectionPool, url, options))


def blocking_pool_from_url(url: str, **options) -> BlockingConnectionPool:
    """A bounded pool for `url` (waits for a free connection instead of opening more)."""
    return _pool(BlockingConnectionPool, url, options)
