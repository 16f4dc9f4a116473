"""The worker's command line: `--processors` picks the processors; `--stages`, its old name, still works
(users' scripts and compose files have it) with a one-line deprecation warning."""

from __future__ import annotations

import pytest

from leadstream.cli import main


@pytest.mark.parametrize("option", ["--processors", "--stages"])
def test_an_unknown_processor_is_refused_by_name(option, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["worker", option, "raw, nope,board"])
    assert exited.value.code == 2
    assert "unknown processor(s) nope; known: raw, lead, account, board, webhooks" in capsys.readouterr().err


def test_the_old_option_name_warns_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["worker", "--stages", "nope"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert warnings == ["leadstream worker: --stages is deprecated; use --processors"]


def test_the_new_option_name_does_not_warn(capsys):
    with pytest.raises(SystemExit):
        main(["worker", "--processors", "nope"])
    assert "deprecated" not in capsys.readouterr().err


def test_erase_needs_someone_or_a_status(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["erase", "--site", "acme"])
    assert exited.value.code == 2 and "erase needs --email, --lead or --status" in capsys.readouterr().err


def test_export_person_needs_an_email(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["export-person", "--site", "acme"])
    assert exited.value.code == 2 and "--email" in capsys.readouterr().err
