"""The Redis client's commands packed by hiredis are byte for byte what redis-py packs (property test), and
each URL scheme keeps its kind of connection (TCP, TLS, Unix socket)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

from processors.runtime.redis_client import PackedConnection, blocking_pool_from_url, connection_class, redis_from_url

ARGUMENT = st.one_of(st.binary(max_size=300), st.text(max_size=100), st.integers(-2**63, 2**63 - 1),
                     st.floats(allow_nan=False, allow_infinity=False))
COMMAND = st.sampled_from(["SET", "MGET", "EVALSHA", "ZADD", b"HSET", "CONFIG GET", b"CLIENT SETNAME"])


@given(COMMAND, st.lists(ARGUMENT, max_size=40))
def test_hiredis_packs_the_bytes_redis_py_packs(command, arguments):
    args = (command, *arguments)
    assert b"".join(PackedConnection().pack_command(*args)) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6379/0", Connection), ("rediss://127.0.0.1:6380/0", SSLConnection),
    ("unix:///run/redis.sock", UnixDomainSocketConnection)])
def test_each_scheme_keeps_its_connection_kind(url, expected):
    assert issubclass(connection_class(url), expected)
    assert redis_from_url(url).connection_pool.connection_class is connection_class(url)
    assert blocking_pool_from_url(url, max_connections=2).connection_class is connection_class(url)


def test_an_unknown_scheme_is_refused_by_name():
    with pytest.raises(ValueError, match="unsupported Redis URL scheme 'http'"):
        connection_class("http://127.0.0.1:6379")
