"""Dockerfiles: hadolint clean, multi-stage, pinned bases, non-root, healthcheck, lean runtime."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from deploy_support import PROJECT_IMAGES, ROOT, run, tool

DOCKERFILES = [ROOT / "docker" / f"{name}.Dockerfile" for name in PROJECT_IMAGES]
PINNED_BASE = re.compile(
    r"^[\w./-]+(:[\w.-]*\d[\w.-]*)(@sha256:[0-9a-f]{64})?$|@sha256:[0-9a-f]{64}$"
)
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "uv ", "uv==", "git ")


def stages(path: Path) -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by build stage."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        result[-1].append(line)
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    proc = run(tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_with_pinned_bases(dockerfile: Path) -> None:
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "build and runtime stages expected"
    for stage in all_stages:
        image = stage[0].split()[1]
        assert "latest" not in image
        assert PINNED_BASE.search(image), f"base image not pinned to an exact tag: {image}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_non_root_lean_and_healthchecked(dockerfile: Path) -> None:
    final = stages(dockerfile)[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "runtime stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    assert any(line.upper().startswith("HEALTHCHECK ") for line in final)
    assert any(line.upper().startswith("CMD ") for line in final)
    runs = " ".join(line for line in final if line.upper().startswith("RUN "))
    for needle in BUILD_TOOLS:
        assert needle not in runs, f"runtime stage installs build tooling: {needle!r}"
    assert "apt-get install" not in runs
    # The dependencies arrive built from the build stage, not installed here.
    assert any(line.startswith("COPY --from=builder /opt/venv") for line in final)


TRAINING = {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx"}


def requirement_names(extra: str | None) -> set[str]:
    """Distributions the core dependencies plus ``extra`` name (``dandelion[x]`` followed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = list(project["dependencies"]) + list(project["optional-dependencies"].get(extra, []))
    names: set[str] = set()
    while pending:
        name, _, extras = re.split(r"[\s<>=!~;]", pending.pop(), maxsplit=1)[0].partition("[")
        if name == project["name"]:
            for included in extras.rstrip("]").split(","):
                pending += project["optional-dependencies"][included]
        else:
            names.add(name.lower())
    return names


def test_extras_keep_tensorflow_out_of_the_serving_faces() -> None:
    """The core and the `serve` (API) and `app` extras have no TensorFlow; `train` has it and
    `pipeline` includes `train`."""
    for extra in (None, "serve", "app"):
        assert not requirement_names(extra) & TRAINING, extra
    assert {"tensorflow-cpu", "keras", "tf2onnx"} <= requirement_names("train")
    assert requirement_names("train") <= requirement_names("pipeline")
    assert {"onnxruntime", "mlflow-skinny", "litestar"} <= requirement_names("serve")
    assert {"voila", "ipykernel", "psycopg"} <= requirement_names("app")


@pytest.mark.parametrize(
    ("image", "extra"), [("api", "serve"), ("app", "app"), ("pipeline", "pipeline")]
)
def test_images_install_their_extra_pinned_by_the_lock(image: str, extra: str) -> None:
    """The first install of the build stage: the extra with the lock as constraints, and no
    package named by hand."""
    builder = " ".join(stages(ROOT / "docker" / f"{image}.Dockerfile")[0])
    command = builder[builder.index("uv pip install ") :].split("&&")[0].split()[3:]
    assert command[command.index("--constraint") + 1] == "requirements.lock"
    rest = [a for a in command if not a.startswith("-")]
    rest = [a for a in rest if a not in {"/opt/venv/bin/python", "requirements.lock"}]
    if "--extra" in command:
        assert command[command.index("-r") + 1] == "pyproject.toml"
        assert rest == ["pyproject.toml", extra]
    else:
        assert rest == [f'".[{extra}]"']


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_credentials_in_images(dockerfile: Path) -> None:
    for line in (line for stage in stages(dockerfile) for line in stage):
        if line.upper().startswith(("ENV ", "ARG ", "LABEL ")):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*\s*=", line, re.I), line


def dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        raw = raw.strip()
        if raw and not raw.startswith("#"):
            negate = raw.startswith("!")
            rules.append((negate, raw.lstrip("!").rstrip("/")))
    return rules


def context_includes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins (a path is sent unless excluded)."""
    included = True
    for negate, pattern in dockerignore_rules():
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", ""))
            for p in prefixes
        ):
            included = negate
    return included


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    for path in (
        ".env",
        ".git/config",
        ".venv/bin/python",
        ".dandelion/store/x",
        "mlruns/0/m",
        "tests/conftest.py",
        "dandelion_lib/__pycache__/x.pyc",
        "api/.env",
    ):
        assert not context_includes(path), f"{path} would be sent to the build context"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_source_is_in_the_build_context(dockerfile: Path) -> None:
    for line in (line for stage in stages(dockerfile) for line in stage):
        if line.upper().startswith("COPY ") and "--from=" not in line:
            sources = [a for a in line.split()[1:-1] if not a.startswith("--")]
            for source in sources:
                assert context_includes(
                    source.rstrip("/") + ("/x" if source.endswith("/") else "")
                ), f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"
