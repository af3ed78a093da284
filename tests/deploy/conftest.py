"""Fixtures for the deployment checks (run by `nox -s deploy_check`).

The validators (hadolint, docker-compose, kubernetes-validate, checkov, check-jsonschema,
zizmor) live in that session's own virtualenv, next to the interpreter. Under the project's
default `nox -s tests` they are absent, so these tests are deselected there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from deploy_support import OVERLAYS, load_all, render

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside `nox -s deploy_check`, deselect these tests (counted as "deselected")."""
    if os.environ.get("DANDELION_DEPLOY_CHECK") == "1":
        return
    mine = [item for item in items if item.path.resolve().is_relative_to(HERE)]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [item for item in items if item not in mine]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay rendered by `kubectl kustomize`, as parsed objects."""
    return {overlay: load_all(render(overlay)) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def rendered_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered overlays as files k8s/<overlay>.yaml (input of checkov)."""
    path = tmp_path_factory.mktemp("rendered") / "k8s"
    path.mkdir()
    for overlay in OVERLAYS:
        (path / f"{overlay}.yaml").write_text(render(overlay))
    return path.parent
