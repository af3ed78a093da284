"""Start a documented nox session the way a user does (``nox -s <name>``, in its own process
group as a terminal gives it), wait until it answers over HTTP, stop it with Ctrl-C (SIGINT to
the group) or SIGTERM (to its process), and check that it exited cleanly and left nothing
running: neither a process it started (Voila's and JupyterLab's kernels included) nor one of
its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.process_support import free_port, stop, wait_http

__all__ = ["NoxSession", "free_port", "nox_session", "wait_http"]

# A server that shut down on a signal: 0, or killed by that signal re-raised after its
# graceful shutdown (uvicorn re-raises SIGTERM), or 130 (Ctrl-C).
CLEAN_EXITS = {0, 130, -signal.SIGINT, -signal.SIGTERM}

STOP_TIMEOUT_S = 180
"""How long a stopped session may take to exit: Voila and JupyterLab shut their kernels down
first, which takes more than a minute on a busy 2-core machine."""


@dataclass
class NoxSession:
    """A running ``nox -s <name>`` and every process seen under it."""

    proc: subprocess.Popen[bytes]
    log: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def record_children(self) -> list[psutil.Process]:
        """Remember the processes now under the session (to check they end with it)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update({child.pid: child for child in children})
        return children

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the session's process group; returns the exit status."""
        self.record_children()
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self) -> int:
        """SIGTERM to the session's process (as a supervisor or `kill` sends it)."""
        self.record_children()
        self.proc.terminate()
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def leftovers(self, grace: float = 15.0) -> list[str]:
        """Processes started under the session, or in its process group, still running."""
        deadline = time.monotonic() + grace
        while True:
            alive = [p for p in self.seen.values() if _alive(p)]
            alive += [p for p in psutil.process_iter() if _in_group(p, self.proc.pid)]
            if not alive or time.monotonic() > deadline:
                return [f"{p.pid} {' '.join(_cmdline(p))}" for p in alive]
            time.sleep(0.5)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return proc.pid != pgid and os.getpgid(proc.pid) == pgid and _alive(proc)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()[:4]
    except psutil.Error:
        return ["?"]


def session_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without its DANDELION_* settings, on a fresh work directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DANDELION_")}
    env.pop("VIRTUAL_ENV", None)
    env["DANDELION_WORKDIR"] = str(tmp_path / "work")
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "jupyter-runtime")
    env.update(extra)
    return env


@contextmanager
def nox_session(
    name: str, tmp_path: Path, *posargs: str, env: dict[str, str]
) -> Iterator[NoxSession]:
    """``nox -s <name> [-- posargs]`` from the repository root, in a new process group."""
    args = [sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py"), "-s", name]
    if posargs:
        args += ["--", *posargs]
    log = tmp_path / f"nox-{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        session = NoxSession(proc, log)
        try:
            yield session
        finally:
            if proc.poll() is None:
                session.record_children()
                stop(proc, timeout=30)
            for child in session.seen.values():
                if _alive(child):
                    child.kill()


def assert_stopped_cleanly(session: NoxSession, status: int, shutdown_line: str) -> None:
    """The exit status is a clean one, the server logged its shutdown, nothing is left."""
    output = session.output()
    assert status in CLEAN_EXITS, f"exit status {status}\n{output[-3000:]}"
    assert shutdown_line in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not session.leftovers(), f"left running: {session.leftovers(0)}"


def ready(session: NoxSession, url: str, timeout: float = 120.0) -> None:
    try:
        wait_http(url, timeout=timeout, proc=session.proc, ready=lambda s: s == 200)
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(f"{exc}\n{session.output()[-3000:]}")
