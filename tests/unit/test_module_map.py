"""tests/README.md maps every library module to the files that test it, and
docs/architecture.md says what each one does; keep both true."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
LIBRARY = TESTS.parent / "dandelion_lib"
ARCHITECTURE = TESTS.parent / "docs" / "architecture.md"
SUB_PACKAGES = ("core", "data", "training", "serving", "lifecycle")


def library_modules() -> set[str]:
    return {
        ".".join(p.relative_to(LIBRARY).with_suffix("").parts)
        for p in LIBRARY.rglob("*.py")
        if p.stem not in ("__init__", "__main__")
    }


def module_map() -> dict[str, list[str]]:
    rows = re.findall(r"^\| `([\w.]+)` \| (.+) \|$", (TESTS / "README.md").read_text(), re.M)
    return {module: re.findall(r"`([\w/]+\.py)`", files) for module, files in rows}


def test_every_module_has_a_row() -> None:
    modules = library_modules() | {"cli"}
    mapped = module_map()
    assert sorted(modules - set(mapped)) == []
    assert sorted(set(mapped) - modules) == []


def test_every_listed_test_file_exists() -> None:
    missing = [f for files in module_map().values() for f in files if not (TESTS / f).is_file()]
    assert missing == []
    assert all(files for files in module_map().values())


def architecture_modules() -> set[str]:
    """The modules named in docs/architecture.md's table "Every module": a row names its
    sub-package in the first column or continues the one above; above the core, modules are
    named by path (``cli/train.py``) or by name (``pipeline``); what a module holds follows it
    in parentheses."""
    section = ARCHITECTURE.read_text().split("\n## Every module\n", 1)[1].split("\n## ", 1)[0]
    named, layer = set(), ""
    for first, modules in re.findall(r"^\|(.*?)\|(.*?)\|.+\|$", section, re.M):
        layer = first.strip(" `") or layer
        prefix = f"{layer}." if layer in SUB_PACKAGES else ""
        for name in re.findall(r"`([\w/.]+)`", re.sub(r"\(.*?\)", "", modules)):
            named.add(prefix + name.removesuffix(".py").replace("/", "."))
    return named


def test_the_architecture_describes_every_module() -> None:
    named = architecture_modules()
    assert sorted(library_modules() - named) == []
    package_files = {m for m in named if m.endswith(("__init__", "__main__"))}
    assert sorted(named - package_files - library_modules()) == []
