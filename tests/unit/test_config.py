"""docs/configuration.md lists every Settings field with its env var and current default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dandelion_lib.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(?P<name>\w+)` \| `(?P<env>\w+)` \| (?P<default>.*?) \| (?P<desc>.+) \|$")


def _format_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "`" + ",".join(map(str, value)) + "`"
    return f"`{value}`"


def _documented() -> dict[str, dict[str, str]]:
    rows = [ROW.match(line) for line in DOC.read_text().splitlines()]
    return {m["name"]: m.groupdict() for m in rows if m}


def test_every_setting_is_documented_with_env_var_and_default() -> None:
    documented = _documented()
    fields = Settings.model_fields
    assert sorted(set(fields) - set(documented)) == [], "settings missing from the doc"
    assert sorted(set(documented) - set(fields)) == [], "doc lists settings that do not exist"
    for name, field in fields.items():
        row = documented[name]
        assert row["env"] == f"DANDELION_{name.upper()}", name
        assert row["default"] == _format_default(field.default), name
        assert row["desc"].strip(), name


def test_every_setting_has_a_description() -> None:
    assert [n for n, f in Settings.model_fields.items() if not f.description] == []
