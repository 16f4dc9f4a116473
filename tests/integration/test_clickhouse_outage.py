"""ClickHouse unreachable while events flow: the sink retries with backoff and loses nothing, doubles nothing.

The sink reaches ClickHouse through a small TCP proxy that the test opens and closes, so the shared
server itself keeps running for the other tests.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import replace

import pytest

from leadstream.runner import Role, count, produce, wait_for
from tests.integration.test_ingest import valid_events

pytestmark = pytest.mark.integration


class SwitchableProxy(threading.Thread):
    """127.0.0.1:<port> -> 127.0.0.1:<target>, refusing connections while closed."""

    def __init__(self, target: int):
        super().__init__(daemon=True)
        self.target = target
        self.open = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close_all(self) -> None:
        self.open = False
        for s in self.connections:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connections.clear()


def test_sink_survives_a_clickhouse_outage_exactly_once(settings, roles):
    proxy = SwitchableProxy(settings.clickhouse_port)
    proxy.start()
    through_proxy = replace(settings, clickhouse_port=proxy.port)
    roles += [Role(settings, "worker", "worker").start(), Role(through_proxy, "sink", "sink").start()]

    n = 6000
    proxy.open = True
    asyncio.run(produce(settings, valid_events(n // 2)))
    wait_for(settings, "SELECT count() FROM events", 1, 120, roles)
    proxy.close_all()  # outage: in-flight and new connections fail
    asyncio.run(produce(settings, valid_events(n)[n // 2:]))
    time.sleep(6)  # the sink keeps retrying while ClickHouse is unreachable
    during = count(settings, "SELECT count() FROM events")
    assert during < n
    proxy.open = True  # back: everything arrives, once
    wait_for(settings, "SELECT count() FROM events", n, 180, roles)
    time.sleep(2)
    assert count(settings, "SELECT count() FROM events") == n
    assert count(settings, "SELECT uniqExact(event_id) FROM events") == n
    assert "retrying" in roles[1].log_tail(200)
