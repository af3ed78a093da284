"""The pipeline around the stages: change detection, data gate, run summary, embedded Airflow.

Nothing here trains or ingests; the stages live in their own modules and run as notebooks
under Airflow (see ``dags/`` and :mod:`dandelion_lib.orchestration`). This module holds the
orchestration logic that does not need Airflow to be imported:

* :func:`code_version` — a digest of the code that shapes a model;
* :func:`decide_training` — train, or skip because the dataset version and code are
  unchanged since the current champion;
* :func:`validate_dataset` — the data quality gate between ingestion and training;
* :func:`check_kernel` — the Jupyter kernel the notebooks run in;
* :func:`format_summary` — the short run summary printed at the end of ``nox -s pipeline``;
* ``dandelion pipeline`` — runs ``airflow dags test`` on the embedded defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dandelion_lib.config import Settings, get_settings
from dandelion_lib.errors import DandelionError

PIPELINE_DAG = "dandelion_pipeline"
RETRAIN_DAG = "dandelion_retrain"
NOTEBOOKS = {
    "ingest": "01_ingest.ipynb",
    "train": "02_train.ipynb",
    "evaluate": "03_evaluate.ipynb",
}
"""Notebook run by each notebook step of the DAGs."""

CODE_VERSION_TAG = "dandelion.code_version"
DATASET_VERSION_TAG = "dandelion.dataset_version"
NOTEBOOK_TAG = "dandelion.notebooks"
RUN_ID_TAG = "airflow.run_id"
TASK_ID_TAG = "airflow.task_id"
DAG_ID_TAG = "airflow.dag_id"


_CODE_FILES = ("requirements.lock",)
_CODE_NOTEBOOKS = (NOTEBOOKS["train"], NOTEBOOKS["evaluate"])


class KernelMissingError(DandelionError):
    """The Jupyter kernel the notebooks need is not registered (or its Python is gone)."""


class DataValidationError(DandelionError):
    """A dataset version failed the data quality gate."""


class PipelineError(DandelionError):
    """The pipeline run failed; the message names the failed step."""


# --- identifiers ---------------------------------------------------------------------------


def run_key(run_id: str) -> str:
    """Store-safe form of an Airflow run id (``manual__2026-01-01T00:00:00+00:00``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)


def run_prefix(run_id: str) -> str:
    """Store prefix of one pipeline run: ``runs/<run key>/``."""
    return f"runs/{run_key(run_id)}/"


def code_version(settings: Settings | None = None, notebooks_dir: Path | None = None) -> str:
    """Digest of the code that shapes a model: ``dandelion_lib``, the training and
    evaluation notebooks (code cells only) and ``requirements.lock`` when present."""
    settings = settings or get_settings()
    package = Path(__file__).resolve().parent
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


# --- kernel --------------------------------------------------------------------------------


def kernel_hint(name: str) -> str:
    return (
        f"register it with: {sys.executable} -m ipykernel install --sys-prefix --name {name} "
        "(any nox session does this when it creates .venv)"
    )


def check_kernel(name: str | None = None) -> Path:
    """Path of the kernel spec ``name`` (default: settings); raise :class:`KernelMissingError`."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    name = name or get_settings().kernel_name
    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(name)
    except NoSuchKernel:
        raise KernelMissingError(
            f"Jupyter kernel {name!r} is not registered; {kernel_hint(name)}"
        ) from None
    program = spec.argv[0] if spec.argv else ""
    if program and os.sep in program and not Path(program).exists():
        raise KernelMissingError(
            f"Jupyter kernel {name!r} points to a missing Python ({program}); {kernel_hint(name)}"
        )
    return Path(spec.resource_dir)


# --- data gate -----------------------------------------------------------------------------


def check_manifest(df: Any, settings: Settings | None = None) -> list[str]:
    """Problems found in a manifest (empty when it passes the data gate)."""
    from dandelion_lib.dataset import MANIFEST_COLUMNS, SPLITS

    settings = settings or get_settings()
    labels = tuple(settings.labels)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        return [f"manifest lacks columns {missing}"]
    if len(df) == 0:
        return ["manifest is empty"]
    problems: list[str] = []
    if df[list(MANIFEST_COLUMNS)].isna().any().any():
        problems.append("manifest has missing values")
    unknown = sorted(set(df["label"]) - set(labels))
    if unknown:
        problems.append(f"unknown labels {unknown}")
    bad_splits = sorted(set(df["split"]) - set(SPLITS))
    if bad_splits:
        problems.append(f"unknown splits {bad_splits}")
    counts = df["label"].value_counts()
    present = [int(counts.get(label, 0)) for label in labels]
    for label, n in zip(labels, present, strict=True):
        if n < settings.min_images_per_class:
            problems.append(f"{label}: {n} images < minimum {settings.min_images_per_class}")
    if min(present) > 0 and max(present) / min(present) > settings.max_class_imbalance:
        problems.append(
            f"class imbalance {max(present) / min(present):.2f} > {settings.max_class_imbalance:g}"
        )
    for split in SPLITS:
        in_split = set(df.loc[df["split"] == split, "label"])
        problems += [
            f"split {split!r} has no {label!r} image" for label in labels if label not in in_split
        ]
    if df["sha256"].duplicated().any():
        problems.append(f"{int(df['sha256'].duplicated().sum())} duplicate images (sha256)")
    straddling = df.groupby("group")["split"].nunique()
    if (straddling > 1).any():
        problems.append(f"{int((straddling > 1).sum())} near-duplicate groups straddle splits")
    return problems


def dataset_counts(df: Any, labels: tuple[str, ...]) -> dict[str, Any]:
    """Image counts of a manifest: total, per label, per split."""
    from dandelion_lib.dataset import SPLITS

    return {
        "images": len(df),
        "labels": {label: int((df["label"] == label).sum()) for label in labels},
        "splits": {split: int((df["split"] == split).sum()) for split in SPLITS},
    }


def validate_dataset(
    version: str | None = None, settings: Settings | None = None, store: Any = None
) -> dict[str, Any]:
    """Load a dataset version and run the data gate; return its counts.

    Raises :class:`DataValidationError` naming every problem when the gate fails.
    """
    from dandelion_lib import dataset
    from dandelion_lib.storage import open_store

    settings = settings or get_settings()
    store = store or open_store(settings=settings)
    version = version or dataset.latest_version(store)
    df = dataset.load_manifest(store, version)
    problems = check_manifest(df, settings)
    if problems:
        raise DataValidationError(f"dataset {version} failed validation: " + "; ".join(problems))
    rejected = len(dataset.load_report(store, version).get("rejected", []))
    return {
        "dataset_version": version,
        **dataset_counts(df, tuple(settings.labels)),
        "rejected_at_ingest": rejected,
    }


# --- skip if unchanged ---------------------------------------------------------------------


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


def champion_lineage(settings: Settings | None = None) -> dict[str, Any] | None:
    """Version, dataset version and code version of the current champion (None: no champion)."""
    from dandelion_lib import registry

    settings = settings or get_settings()
    client = registry.configure_mlflow(settings)
    mv = registry.get_alias_version(client, settings.model_name, registry.CHAMPION)
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
        import mlflow

        info = mlflow.models.get_model_info(f"models:/{settings.model_name}/{mv.version}")
        dataset_version = (info.metadata or {}).get("dataset_version")
    return {"version": str(mv.version), "dataset_version": dataset_version, "code_version": code}


def decide_training(
    dataset_version: str,
    settings: Settings | None = None,
    *,
    force: bool = False,
    notebooks_dir: Path | None = None,
) -> TrainingDecision:
    """Train unless the dataset version and the code are those of the current champion."""
    settings = settings or get_settings()
    code = code_version(settings, notebooks_dir)
    champion = champion_lineage(settings)
    version = champion["version"] if champion else None

    def decide(train: bool, reason: str) -> TrainingDecision:
        return TrainingDecision(train, reason, dataset_version, code, version)

    if force:
        return decide(True, "training forced")
    if champion is None:
        return decide(True, f"no {settings.model_name}@champion yet")
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


# --- run summary ---------------------------------------------------------------------------


def where_to_look(settings: Settings, run_id: str | None = None) -> dict[str, str]:
    """Commands and paths a user opens after a run."""
    uri = settings.resolved_tracking_uri
    if uri.startswith(("http://", "https://")):
        mlflow = f"open {uri}"
    else:
        mlflow = f"mlflow ui --backend-store-uri {uri} --port 5000"
    store = settings.resolved_store_url
    look = {"mlflow": mlflow, "store": store.removeprefix("file://")}
    if run_id:
        look["notebooks"] = f"{look['store'].rstrip('/')}/{run_prefix(run_id)}"
    return look


def _fmt_counts(counts: dict[str, Any]) -> str:
    labels = ", ".join(f"{k} {v}" for k, v in counts.get("labels", {}).items())
    splits = counts.get("splits", {})
    order = [s for s in ("train", "val", "test") if s in splits] + sorted(
        set(splits) - {"train", "val", "test"}
    )
    split_text = " / ".join(f"{s} {splits[s]}" for s in order)
    rejected = counts.get("rejected_at_ingest")
    tail = f"; {rejected} rejected at ingestion" if rejected else ""
    return f"{counts.get('images', '?')} images ({labels}; {split_text}{tail})"


def format_summary(summary: dict[str, Any]) -> str:
    """The short, human summary of one run (printed by ``dandelion pipeline``)."""
    lines = [
        f"dandelion pipeline: {summary.get('status', 'unknown').upper()}  "
        f"(dag {summary.get('dag_id')}, run {summary.get('run_id')})"
    ]

    def row(name: str, text: str) -> None:
        lines.append(f"  {name:<10} {text}")

    for failure in summary.get("failures", []):
        row("failed", f"{failure['task_id']}: {failure['error']}")
        if failure.get("notebook"):
            row("", f"executed notebook: {failure['notebook']}")
    if summary.get("dataset_version"):
        counts = summary.get("counts") or {}
        row("dataset", f"{summary['dataset_version']}  {_fmt_counts(counts) if counts else ''}")
    decision = summary.get("training")
    if decision:
        state = (summary.get("task_states") or {}).get("train", "success")
        if not decision["train"]:
            verdict = "skipped"
        elif state == "success":
            verdict = "trained"
        else:
            verdict = f"not trained (step train {state})"
        row("training", f"{verdict}: {decision['reason']}")
    model = summary.get("model")
    if model:
        acc = model.get("test_accuracy")
        acc_text = f"test accuracy {acc:.4f}" if isinstance(acc, float) else "no test accuracy"
        row("model", f"{model['name']} version {model['version']}  {acc_text}")
    promotion = summary.get("promotion")
    if promotion:
        row(
            "promotion",
            ("promoted: " if promotion["promoted"] else "not promoted: ") + promotion["reason"],
        )
    aliases = summary.get("aliases")
    if aliases:
        row("aliases", ", ".join(f"{a} -> v{v}" for a, v in aliases.items()) or "none")
    for name, text in (summary.get("look") or {}).items():
        row(name, text)
    return "\n".join(lines)


# --- embedded Airflow ----------------------------------------------------------------------


def airflow_env(settings: Settings | None = None) -> dict[str, str]:
    """Environment of the embedded Airflow: SQLite DB under the work dir, our DAGs only."""
    settings = settings or get_settings()
    home = settings.resolved_airflow_home
    dags = Path(__file__).resolve().parents[1] / "dags"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "DANDELION_WORKDIR": str(settings.workdir_path),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "PYTHONUNBUFFERED": "1",
    }


def task_env(settings: Settings, source: str | None = None) -> dict[str, str]:
    """:func:`airflow_env` plus the settings the tasks need when they run in the work dir.

    The tasks run with the work directory as their current directory (so that nothing a
    library writes relative to it lands in the checkout); the ``DANDELION_*`` values of a
    ``.env`` file here are passed on, and relative paths are made absolute.
    """
    env = airflow_env(settings)
    if Path(".env").is_file():
        from dotenv import dotenv_values

        for key, value in dotenv_values(".env").items():
            if key.upper().startswith("DANDELION_") and value is not None:
                env.setdefault(key.upper(), os.environ.get(key, value))
    src = source or settings.source
    if "://" not in src:  # a local folder
        src = str(Path(src).expanduser().resolve())
    env["DANDELION_SOURCE"] = src
    if settings.notebooks_dir is not None:
        env["DANDELION_NOTEBOOKS_DIR"] = str(settings.resolved_notebooks_dir)
    if settings.airflow_home is not None:
        env["DANDELION_AIRFLOW_HOME"] = str(settings.resolved_airflow_home)
    store = settings.resolved_store_url
    if "://" not in store:  # a plain local path
        store = Path(store).expanduser().resolve().as_uri()
    env["DANDELION_STORE_URL"] = store
    return env


def _airflow_exe() -> str:
    exe = Path(sys.executable).parent / "airflow"
    if not exe.exists():
        raise PipelineError(
            "Airflow is not installed in this environment; install the 'pipeline' extra "
            "(nox does: nox -s pipeline)"
        )
    return str(exe)


def ensure_airflow_db(env: dict[str, str]) -> bool:
    """Migrate Airflow's SQLite DB once per Airflow release; True when it ran."""
    from importlib.metadata import version

    home = Path(env["AIRFLOW_HOME"])
    stamp = home / ".db-migrated"
    release = version("apache-airflow")
    if stamp.exists() and stamp.read_text().strip() == release and (home / "airflow.db").exists():
        return False
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [_airflow_exe(), "db", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:] + proc.stderr.splitlines()[-20:])
        raise PipelineError(f"airflow db migrate failed:\n{tail}")
    stamp.write_text(release)
    return True


_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(\S+)")
_RETRY = re.compile(r"new_state=up_for_retry")


def run_dag(
    dag_id: str,
    conf: dict[str, Any],
    env: dict[str, str],
    *,
    log_path: Path,
    verbose: bool = False,
    cwd: Path | None = None,
) -> int:
    """``airflow dags test <dag_id>``; streams progress, keeps the full log; returns its status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    cmd = [_airflow_exe(), "dags", "test", dag_id, "-c", json.dumps(conf)]
    with log_path.open("w") as log:
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if verbose:
                print(line, end="", flush=True)
                continue
            if m := _TASK_START.search(line):
                print(f"[{time.monotonic() - start:6.1f}s] {m.group(1)}", flush=True)
            elif _RETRY.search(line):
                print(f"[{time.monotonic() - start:6.1f}s]   failed, retry scheduled", flush=True)
        return proc.wait()


def read_summary(settings: Settings, trigger: str) -> dict[str, Any] | None:
    """The summary written by the run started with ``trigger`` (None when absent)."""
    from dandelion_lib.storage import ObjectNotFoundError, open_store

    store = open_store(settings=settings)
    try:
        latest = store.get_json("runs/latest")
        if latest.get("trigger") != trigger:
            return None
        summary: dict[str, Any] = store.get_json(f"{run_prefix(latest['run_id'])}summary.json")
        return summary
    except ObjectNotFoundError:
        return None


# --- CLI -----------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dag", default=PIPELINE_DAG, choices=[PIPELINE_DAG, RETRAIN_DAG], help="DAG to run."
    )
    parser.add_argument(
        "--force-train", action="store_true", help="Train even when nothing changed."
    )
    parser.add_argument(
        "--source", default=None, help="Image source (URL or folder); default DANDELION_SOURCE."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Stream Airflow's log.")


def cli(args: argparse.Namespace) -> int:
    """Run a DAG with ``airflow dags test`` on the embedded defaults and print its summary."""
    settings = get_settings()
    check_kernel(settings.kernel_name)
    env = task_env(settings, source=args.source)
    home = Path(env["AIRFLOW_HOME"])
    if ensure_airflow_db(env):
        print(f"Airflow DB migrated under {home}", flush=True)
    trigger = uuid.uuid4().hex
    conf = {"force_train": bool(args.force_train), "trigger": trigger}
    log_path = home / "logs" / "dags-test" / f"{time.strftime('%Y%m%dT%H%M%S')}-{args.dag}.log"
    print(f"airflow dags test {args.dag}  (log: {log_path})", flush=True)
    start = time.monotonic()
    rc = run_dag(
        args.dag, conf, env, log_path=log_path, verbose=args.verbose, cwd=settings.workdir_path
    )
    elapsed = time.monotonic() - start
    summary = read_summary(settings, trigger)
    print()
    if summary is None:
        print(f"No run summary was written; read the log: {log_path}", file=sys.stderr)
        return rc or 1
    print(format_summary(summary))
    print(f"  {'log':<10} {log_path}\n  {'time':<10} {elapsed:.0f} s")
    if rc == 0 and summary.get("status") == "failed":
        rc = 1
    return rc
