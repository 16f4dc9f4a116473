"""`leadstream stack`: idempotent up, honest status, a one-line error when a port is taken."""

from __future__ import annotations

import socket
from pathlib import Path
from dataclasses import replace

import pytest

from leadstream import stack
from leadstream.stack import StackError

pytestmark = pytest.mark.integration


def test_up_is_idempotent_and_status_reports_every_server(stack_settings, capsys):
    stack.up(stack_settings)  # already up from the session fixture: must not start twice
    out = capsys.readouterr().out
    assert out.count("already up") == 3
    assert stack.status(stack_settings) is True
    assert "redis" in capsys.readouterr().out


def test_a_taken_port_is_a_clear_error_not_a_crash(stack_settings, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        other = replace(stack_settings, stack_dir=str(tmp_path), redis_url=f"redis://127.0.0.1:{port}/0")
        with pytest.raises(StackError, match=f"port {port} for redis is taken by another process"):
            stack.up(other)
        assert stack.main_stack("up", other) == 2
        redis_server = next(s for s in stack.servers(other) if s.name == "redis")
        assert redis_server.status() == f"port {port} is taken by a process this stack did not start"


def test_kafka_storage_formats_with_a_cluster_id_that_starts_with_a_dash(stack_settings, tmp_path):
    """About one random id in 64 starts with '-'; the storage tool must not read it as an option."""
    libs = Path(stack_settings.cache_dir) / f"kafka-{stack_settings.kafka_version}" / "libs"
    props = tmp_path / "server.properties"
    props.write_text(f"process.roles=controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:1\n"
                     f"controller.listener.names=CONTROLLER\nlisteners=CONTROLLER://127.0.0.1:1\n"
                     f"log.dirs={tmp_path / 'logs'}\n")
    stack.format_kafka_storage(libs, props, "-" + "A" * 21)
    meta = (tmp_path / "logs" / "meta.properties").read_text()
    assert "cluster.id=-AAAAAAAAAAAAAAAAAAAAA" in meta
