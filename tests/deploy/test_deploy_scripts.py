"""Shell scripts of the deployment (init, secrets, CD deploy), of the image builds and the images
(wheelhouse, base stand-ins, pip, the pipeline image's /entrypoint and /clean-logs) and the CI entry
point: shellcheck clean and strict (`set -e…`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_support import ROOT, run, tool

SCRIPTS = [
    *sorted((ROOT / "k8s").rglob("*.sh")),
    *sorted((ROOT / "scripts").glob("backup-*.sh")),
    *sorted((ROOT / "scripts").glob("restore-*.sh")),
    ROOT / "scripts" / "object-store-env.sh",
    # (docker-engine.sh never fails by design: without an engine the docker sessions skip.)
    ROOT / "scripts" / "docker-wheelhouse.sh",
    ROOT / "scripts" / "docker-stand-ins.sh",
    ROOT / "scripts" / "pip.sh",
    *sorted((ROOT / "docker").glob("*.sh")),
    ROOT / ".ci" / "run",
]


def test_scripts_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"deploy.sh", "create-dev-secrets.sh", "init-buckets.sh", "init-databases.sh",
            "db-upgrade.sh", "backup-postgres.sh", "restore-postgres.sh",
            "backup-object-store.sh", "restore-object-store.sh"} <= names  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean_and_strict(script: Path) -> None:
    proc = run(tool("shellcheck"), "--severity=style", str(script))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "set -e" in script.read_text() or "set -eu" in script.read_text()
