"""tests/README.md maps every library module to the files that test it; keep the map true."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
LIBRARY = TESTS.parent / "dandelion_lib"


def module_map() -> dict[str, list[str]]:
    rows = re.findall(r"^\| `([\w.]+)` \| (.+) \|$", (TESTS / "README.md").read_text(), re.M)
    return {module: re.findall(r"`([\w/]+\.py)`", files) for module, files in rows}


def test_every_module_has_a_row() -> None:
    modules = {
        ".".join(p.relative_to(LIBRARY).with_suffix("").parts)
        for p in LIBRARY.rglob("*.py")
        if p.stem not in ("__init__", "__main__")
    } | {"cli"}
    mapped = module_map()
    assert sorted(modules - set(mapped)) == []
    assert sorted(set(mapped) - modules) == []


def test_every_listed_test_file_exists() -> None:
    missing = [f for files in module_map().values() for f in files if not (TESTS / f).is_file()]
    assert missing == []
    assert all(files for files in module_map().values())
