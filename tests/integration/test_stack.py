"""`leadstream stack`: idempotent up, honest status, a one-line error when a port is taken."""

from __future__ import annotations

import socket
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
