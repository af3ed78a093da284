"""Settings: typed groups with flat environment variables, and docs/configuration.md lists
every field under its group's heading with its env var and current default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dandelion_lib.core.config import GROUPS, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(?P<name>\w+)` \| `(?P<env>\w+)` \| (?P<default>.*?) \| (?P<desc>.+) \|$")
HEADING = re.compile(r"^## .*\(`settings\.(?P<group>\w+)`\)$")


def _format_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "`" + ",".join(map(str, value)) + "`"
    return f"`{value}`"


def _documented() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    group = ""
    for line in DOC.read_text().splitlines():
        if heading := HEADING.match(line):
            group = heading["group"]
        elif row := ROW.match(line):
            out[row["name"]] = row.groupdict() | {"group": group}
    return out


def _fields() -> dict[str, tuple[str, Any]]:
    """Every field by flat name: (its group, or ``labels`` for the root's, and its FieldInfo)."""
    out = {n: ("labels", f) for n, f in Settings.model_fields.items() if n not in GROUPS}
    for group, cls in GROUPS.items():
        out |= {n: (group, f) for n, f in cls.model_fields.items()}
    return out


def test_every_setting_is_documented_under_its_group_with_env_var_and_default() -> None:
    documented = _documented()
    fields = _fields()
    assert sorted(set(fields) - set(documented)) == [], "settings missing from the doc"
    assert sorted(set(documented) - set(fields)) == [], "doc lists settings that do not exist"
    for name, (group, field) in fields.items():
        row = documented[name]
        assert row["group"] == group, name
        assert row["env"] == f"DANDELION_{name.upper()}", name
        assert row["default"] == _format_default(field.default), name
        assert row["desc"].strip(), name


def test_every_setting_has_a_description_and_one_group() -> None:
    assert [n for n, (_, f) in _fields().items() if not f.description] == []
    names = [n for cls in GROUPS.values() for n in cls.model_fields]
    assert len(names) == len(set(names)), "a field name in two groups"


def test_environment_variables_stay_flat_and_reach_their_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DANDELION_STORE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("DANDELION_CONFIDENCE_THRESHOLD", "0.8")
    monkeypatch.setenv("DANDELION_LABELS", '["cat","dog"]')
    settings = Settings()
    assert settings.storage.store_url == "s3://bucket/prefix"
    assert settings.serving.confidence_threshold == 0.8
    assert settings.labels == ("cat", "dog")


def test_flat_names_are_routed_to_their_group_and_validated(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path, split_seed=7, store_url="file:///elsewhere")
    assert settings.storage.workdir == tmp_path
    assert settings.ingest.split_seed == 7
    assert settings.resolved_store_url == "file:///elsewhere"
    changed = settings.updated(split_seed=8, confidence_threshold=0.9)
    assert (changed.ingest.split_seed, changed.serving.confidence_threshold) == (8, 0.9)
    assert changed.storage.workdir == tmp_path  # the rest is kept
    assert settings.ingest.split_seed == 7  # frozen: the original is unchanged
    assert settings.flat()["split_seed"] == 7
    with pytest.raises(ValidationError):
        settings.updated(feature_shard_size=0)


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
