"""docs/configuration.md lists every Settings field with its env var and current default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dandelion_lib.core.config import Settings

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


def test_cpu_limit_follows_the_cgroup_quota(tmp_path: Path) -> None:
    """cgroup v2 ``cpu.max`` and v1 ``cfs_quota_us``: the quota rounded up, never above the
    CPUs the process may run on; no quota (``max``, -1, no file): those CPUs."""
    import os

    from dandelion_lib.core.config import cpu_limit

    available = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_limit(v2) == min(available, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_limit(v2) == available
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_limit(tmp_path / "v1") == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_limit(tmp_path / "v1") == available
    assert cpu_limit(tmp_path / "none") == available
