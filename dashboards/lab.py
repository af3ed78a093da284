"""JupyterLab on the project's notebooks, to explore and retrain by hand: ``python -m
dashboards.lab`` (``nox -s lab``).

* Opens ``notebooks/`` (ingest, train, evaluate, drift), the notebooks the pipeline runs, with
  the ``dandelion`` kernel as the default (created when missing, as for the web app).
* On the embedded defaults: ``DANDELION_WORKDIR`` is made absolute (default ``.dandelion``
  of the directory it is started from, the repository root under nox), so a notebook run in
  ``notebooks/`` reads and writes the same store, MLflow database and feedback database as
  ``nox -s pipeline``. Other ``DANDELION_*`` settings pass through unchanged.
* Binds 127.0.0.1 with Jupyter's own token (printed in the URL at start); also as root
  (``--allow-root`` is passed when the effective user is root, as in containers).

Extra arguments are passed to JupyterLab unchanged (e.g. ``--port=8890``, ``--help``).
"""

from __future__ import annotations

import os
import sys

from dandelion_lib.core.config import Settings, get_settings
from dashboards.serve import KERNEL, ROOT, environment

NOTEBOOKS = ROOT / "notebooks"


def lab_argv(extra: list[str] | None = None) -> list[str]:
    """The command line: JupyterLab (the virtual environment's) on ``notebooks/``."""
    return [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={NOTEBOOKS}",
        "--ServerApp.ip=127.0.0.1",
        f"--MappingKernelManager.default_kernel_name={KERNEL}",
        # Jupyter refuses to start as root; root is the usual user in containers.
        *(["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []),
        *(extra or []),
    ]


def lab_environment(settings: Settings) -> dict[str, str]:
    """The environment JupyterLab and its kernels run in: the process's, with the dandelion
    kernel findable, ``dashboards`` importable and the work directory absolute."""
    env = {**os.environ, **environment(settings)}
    env["DANDELION_WORKDIR"] = str(settings.workdir_path)
    return env


def main(argv: list[str] | None = None) -> int:
    """Replace this process with JupyterLab."""
    argv = lab_argv(list(sys.argv[1:] if argv is None else argv))
    os.execve(argv[0], argv, lab_environment(get_settings()))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
