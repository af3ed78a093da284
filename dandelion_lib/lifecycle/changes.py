"""Change detection: train, or skip because the dataset version and the code that shapes a
model are those of the current champion.

* :func:`code_version`: a digest of ``dandelion_lib``, the training and evaluation notebooks
  (code cells only) and ``requirements.lock``;
* :func:`decide_training`: the decision, with its reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dandelion_lib.core.config import Settings
from dandelion_lib.core.runs import CODE_VERSION_TAG, DATASET_VERSION_TAG, NOTEBOOKS
from dandelion_lib.lifecycle import registry

_CODE_FILES = ("requirements.lock",)
_CODE_NOTEBOOKS = (NOTEBOOKS["train"], NOTEBOOKS["evaluate"])


def code_version(settings: Settings, notebooks_dir: Path | None = None) -> str:
    """Digest of the code that shapes a model: ``dandelion_lib``, the training and
    evaluation notebooks (code cells only) and ``requirements.lock`` when present."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode())
        h.update(path.read_bytes())
    nb_dir = notebooks_dir or settings.resolved_notebooks_dir
    for name in _CODE_NOTEBOOKS:
        path = nb_dir / name
        if path.exists():
            h.update(name.encode())
            h.update(_notebook_code(path).encode())
    for name in _CODE_FILES:
        path = package.parent / name
        if path.exists():
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text()).get("cells", [])
    return "\n\n".join(
        "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        for c in cells
        if c.get("cell_type") == "code"
    )


@dataclass(frozen=True)
class TrainingDecision:
    """Whether to train, and why."""

    train: bool
    reason: str
    dataset_version: str
    code_version: str
    champion_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def champion_lineage(settings: Settings) -> dict[str, Any] | None:
    """Version, dataset version and code version of the current champion (None: no champion)."""
    client = registry.configure_mlflow(settings)
    mv = registry.get_alias_version(client, settings.tracking.model_name, registry.CHAMPION)
    if mv is None:
        return None
    tags = dict(mv.tags or {})
    dataset_version = tags.get(DATASET_VERSION_TAG)
    code = tags.get(CODE_VERSION_TAG)
    if (code is None or dataset_version is None) and mv.run_id:
        run_tags = client.get_run(mv.run_id).data.tags
        code = code or run_tags.get(CODE_VERSION_TAG)
        dataset_version = dataset_version or run_tags.get(DATASET_VERSION_TAG)
    if dataset_version is None:
        dataset_version = registry.logged_dataset_version(
            settings.tracking.model_name, str(mv.version)
        )
    return {"version": str(mv.version), "dataset_version": dataset_version, "code_version": code}


def decide_training(
    dataset_version: str,
    settings: Settings,
    *,
    force: bool = False,
    notebooks_dir: Path | None = None,
) -> TrainingDecision:
    """Train unless the dataset version and the code are those of the current champion."""
    code = code_version(settings, notebooks_dir)
    champion = champion_lineage(settings)
    version = champion["version"] if champion else None

    def decide(train: bool, reason: str) -> TrainingDecision:
        return TrainingDecision(train, reason, dataset_version, code, version)

    if force:
        return decide(True, "training forced")
    if champion is None:
        return decide(True, f"no {settings.tracking.model_name}@champion yet")
    if champion["dataset_version"] != dataset_version:
        return decide(
            True,
            f"new dataset version {dataset_version} "
            f"(champion v{version} was trained on {champion['dataset_version']})",
        )
    if champion["code_version"] != code:
        return decide(
            True,
            f"code changed: {code} (champion v{version} was trained with "
            f"{champion['code_version'] or 'unrecorded code'})",
        )
    return decide(
        False,
        f"dataset {dataset_version} and code {code} unchanged since champion v{version}",
    )
