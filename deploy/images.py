"""`nox -s images`: build every project image for real, print its size, and run each one the
way compose.yaml and Kubernetes declare it: its own non-root user, read-only root filesystem,
all capabilities dropped, no privilege escalation, only the declared tmpfs mounts writable.

Offline: the Python packages come from a wheelhouse (scripts/docker-wheelhouse.sh) served on
loopback to the builds; the `python:3.11.14-slim-bookworm` base is pulled where a registry is
reachable, otherwise built locally from Debian packages (scripts/docker-stand-ins.sh).

    python -m deploy.images [--skip-build] [NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy import dockerkit as dk
from deploy.dockerkit import ROOT, StepFailed


@dataclass(frozen=True)
class Smoke:
    """How to start an image and what must answer for it to count as running."""

    service: str  # the compose service whose hardening (read_only, tmpfs) applies
    port: int | None  # container port of the HTTP health endpoint
    path: str = ""
    env: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    tmpfs: tuple[str, ...] = ()  # in addition to the compose service's


SMOKES: dict[str, Smoke] = {
    # No tracking server behind it: liveness only (readiness needs a champion).
    "api": Smoke("api", 8000, "/health/live", env={"DANDELION_TRACKING_URI": "http://127.0.0.1:9"}),
    "app": Smoke("app", 8866, "/health/live"),
    # A throw-away SQLite backend and artifact root under the declared /tmp tmpfs.
    "mlflow": Smoke(
        "mlflow",
        5000,
        "/health",
        env={
            "MLFLOW_BACKEND_STORE_URI": "sqlite:////tmp/mlflow.db",
            "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/artifacts",
        },
    ),
    # The Airflow image is exercised fully (scheduler, api-server, a notebook task) by
    # tests/images; here: it starts read-only and imports what Kubernetes configures.
    "pipeline": Smoke(
        "airflow-scheduler",
        None,
        command=(
            "python",
            "-c",
            "import airflow.providers.cncf.kubernetes.executors.kubernetes_executor as k, "
            "airflow.providers.fab.auth_manager.fab_auth_manager as f, subprocess, "
            # what training's INT8 quantization imports lazily (onnxruntime needs sympy)
            "onnxruntime.tools.symbolic_shape_infer as q; "
            "subprocess.run(['airflow', 'version'], check=True)",
        ),
        tmpfs=("/tmp", "/opt/airflow/logs:uid=50000,gid=0"),
    ),
}


def build(name: str, index_url: str | None) -> float:
    """docker build one project image; returns seconds."""
    args = [
        "build",
        "--network",
        "host",
        "-f",
        f"docker/{name}.Dockerfile",
        "-t",
        dk.image_tag(name),
    ]
    if index_url:
        args += ["--build-arg", f"PIP_INDEX_URL={index_url}"]
        args += ["--build-arg", f"UV_DEFAULT_INDEX={index_url}"]
    start = time.monotonic()
    proc = subprocess.run(
        ["docker", *args, str(ROOT)],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise StepFailed(f"build of {name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.monotonic() - start


def hardening_args(service: str, extra_tmpfs: tuple[str, ...] = ()) -> list[str]:
    """docker run flags for a compose service's declared hardening (+ read-only always)."""
    spec = dk.compose_services()[service]
    args = ["--read-only", "--security-opt", "no-new-privileges:true", "--cap-drop", "ALL"]
    for mount in [*spec.get("tmpfs", []), *extra_tmpfs]:
        args += ["--tmpfs", mount]
    return args


def check_user(name: str) -> str:
    user = dk.docker("image", "inspect", "--format", "{{.Config.User}}", dk.image_tag(name)).stdout
    user = user.strip()
    if not user or user.split(":")[0] in ("0", "root"):
        raise StepFailed(f"{name}: image runs as root (USER {user!r})")
    return user


def smoke(name: str) -> float:
    """Run the image read-only as declared; return seconds until it answered."""
    spec = SMOKES[name]
    container = f"dandelion-smoke-{name}"
    dk.docker("rm", "-f", container, check=False)
    args = ["run", "--name", container, *hardening_args(spec.service, spec.tmpfs)]
    for key, value in spec.env.items():
        args += ["-e", f"{key}={value}"]
    start = time.monotonic()
    try:
        if spec.port is None:
            proc = dk.docker(*args, dk.image_tag(name), *spec.command, check=False, timeout=300)
            if proc.returncode != 0:
                raise StepFailed(
                    f"{name}: exited {proc.returncode}\n{(proc.stdout + proc.stderr)[-2000:]}"
                )
            return time.monotonic() - start
        dk.docker(*args, "-d", "-p", f"127.0.0.1::{spec.port}", dk.image_tag(name))
        port = dk.published_port(container, spec.port)
        url = f"http://127.0.0.1:{port}{spec.path}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if dk.http_status(url) == 200:
                return time.monotonic() - start
            if not dk.inspect(container)["State"]["Running"]:
                raise StepFailed(f"{name}: exited read-only\n{dk.container_logs(container)}")
            time.sleep(1.0)
        raise StepFailed(f"{name}: {spec.path} did not answer 200\n{dk.container_logs(container)}")
    finally:
        dk.docker("rm", "-f", container, check=False)


def ensure_inputs() -> Path:
    """The python base image (pulled, or the local stand-in) and the wheelhouse folder."""
    base = "python:3.11.14-slim-bookworm"
    if not dk.image_exists(base) and dk.docker("pull", base, check=False).returncode != 0:
        subprocess.run([str(ROOT / "scripts" / "docker-stand-ins.sh"), "--python-only"], check=True)
    subprocess.run([str(ROOT / "scripts" / "docker-wheelhouse.sh")], check=True)
    return dk.CACHE / "wheelhouse"


def build_stand_ins(index_url: str) -> float:
    """The rehearsal-only stand-in image (deploy/rehearsal/stand-ins.Dockerfile)."""
    start = time.monotonic()
    subprocess.run([str(ROOT / "scripts" / "docker-stand-ins.sh")], check=True)
    proc = subprocess.run(
        [
            "docker", "build", "--network", "host", "-f", "deploy/rehearsal/stand-ins.Dockerfile",
            "-t", dk.STAND_INS_IMAGE, "--build-arg", f"PIP_INDEX_URL={index_url}", str(ROOT),
        ],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise StepFailed(f"build of the stand-ins failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build and check the project images.")
    parser.add_argument("names", nargs="*", default=list(dk.PROJECT_IMAGES))
    parser.add_argument("--skip-build", action="store_true", help="check the existing images")
    parser.add_argument(
        "--build-only", action="store_true", help="build, and leave the checks to a later call"
    )
    parser.add_argument(
        "--stand-ins", action="store_true", help="also build the rehearsal stand-in image"
    )
    opts = parser.parse_args(argv)
    if opts.skip_build and opts.build_only:
        parser.error("--skip-build and --build-only exclude each other")
    problem = dk.engine_problem()
    if problem:
        print(f"images: SKIPPED, {problem}; nothing was built or checked")
        return 0
    builds: dict[str, float] = {}
    try:
        if not opts.skip_build:
            wheelhouse = ensure_inputs()
            with dk.serve_index(wheelhouse) as url:
                for name in opts.names:
                    builds[name] = build(name, url)
                    print(f"built {dk.image_tag(name)} in {builds[name]:.0f} s", flush=True)
                if opts.stand_ins:
                    took = build_stand_ins(url)
                    print(f"built {dk.STAND_INS_IMAGE} in {took:.0f} s", flush=True)
    except (StepFailed, subprocess.CalledProcessError) as exc:
        print(f"images: FAILED to build: {exc}")
        return 1
    if opts.build_only:
        return 0
    rows: list[str] = []
    failed = False
    for name in opts.names:
        tag = dk.image_tag(name)
        try:
            user = check_user(name)
            took = smoke(name)
            status = f"ok (user {user}, read-only, answered in {took:.0f} s)"
        except StepFailed as exc:
            failed = True
            status = f"FAILED: {exc}"
        size = dk.image_size(tag) / 1e6
        built = f"built in {builds[name]:.0f} s, " if name in builds else ""
        rows.append(f"  {tag:48s} {size:8.0f} MB  {built}{status}")
    print("images:")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
