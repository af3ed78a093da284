"""The command line (dandelion_lib.cli): usage, unknown commands, one-line user errors."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from dandelion_lib import cli
from dandelion_lib.core.errors import DandelionError


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.COMMANDS)
    assert all(importlib.util.find_spec(module) for module, _ in cli.COMMANDS.values())


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_a_user_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = types.ModuleType("dandelion_fake_stage")
    stage.add_cli_arguments = lambda parser: None  # type: ignore[attr-defined]

    def fail(args: object) -> int:
        raise DandelionError("the source folder does not exist")

    stage.cli = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, stage.__name__, stage)
    monkeypatch.setitem(cli.COMMANDS, "fake", (stage.__name__, "A stage that fails."))
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err == "dandelion fake: error: the source folder does not exist\n"
