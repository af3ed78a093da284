"""Whole-pipeline wall time over the reference dataset (target: <= 5 minutes on 2 cores).

Three measurements in one run, each in a fresh work directory, the 400 reference images
served on loopback HTTP:

* baseline — the same stages called directly in one fresh Python process (imports included),
  no Airflow, no Papermill, no notebook figures: ingest -> validate -> train -> evaluate (the
  scoring step, saved with the run) -> promote (reads the saved scores);
* pipeline, cold — ``dandelion pipeline`` (what ``nox -s pipeline`` runs): Airflow DB migration,
  ``airflow dags test dandelion_pipeline``, notebooks through Papermill, summary;
* pipeline, re-run — the same again: nothing to download, training skipped.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
TARGET_S = 300.0


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(path: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(path))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def _baseline(workdir: Path, source: str) -> dict[str, Any]:
    """The stages in-process, in the pipeline's order, with the same settings."""
    from dandelion_lib.core.config import Settings
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data import datagate
    from dandelion_lib.data.ingest import ingest
    from dandelion_lib.lifecycle import promotion, registry, scoring, train
    from dandelion_lib.training.config import TrainConfig

    settings = Settings(workdir=workdir, source=source)
    laps: dict[str, float] = {}
    start = time.perf_counter()
    report = ingest(settings, progress=False)
    laps["ingest"] = time.perf_counter() - start
    t = time.perf_counter()
    datagate.validate_dataset(report.version, settings)
    laps["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    result = train.train(TrainConfig(dataset_version=report.version), settings)
    laps["train"] = time.perf_counter() - t
    t = time.perf_counter()
    # the scoring step (notebook 03 in the DAG): scored once, saved; promote reads the scores
    client = registry.configure_mlflow(settings)
    challenger = registry.get_alias_version(
        client, settings.tracking.model_name, registry.CHALLENGER
    )
    split = scoring.Split.of(open_store(settings=settings), result.dataset_version, settings)
    scoring.challenger_scores(settings, client, split, challenger)
    laps["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    promoted = promotion.promote(settings, dataset_version=report.version)
    laps["promote"] = time.perf_counter() - t
    return {
        "seconds": time.perf_counter() - start,
        "laps": laps,
        "test_accuracy": result.metrics.get("test_accuracy"),
        "promoted": promoted.promoted,
    }


def _baseline_in_child(workdir: Path, source: str) -> dict[str, Any]:
    """:func:`_baseline` in a fresh interpreter (its logs kept out of the figures)."""
    start = time.perf_counter()
    code = (
        "import json, sys; from pathlib import Path; from benchmarks.bench_pipeline import "
        "_baseline; print('RESULT' + json.dumps(_baseline(Path(sys.argv[1]), sys.argv[2])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(workdir), source],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(f"baseline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT"))
    result["process_seconds"] = time.perf_counter() - start
    return result


def _pipeline(workdir: Path, source: str) -> tuple[float, int, str]:
    env = {
        **os.environ,
        "DANDELION_WORKDIR": str(workdir),
        "DANDELION_SOURCE": source,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for key in ("DANDELION_STORE_URL", "DANDELION_TRACKING_URI", "DANDELION_AIRFLOW_HOME"):
        env.pop(key, None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dandelion_lib.cli", "pipeline"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    return time.perf_counter() - start, proc.returncode, proc.stdout + proc.stderr


def _summary_lines(output: str) -> str:
    keep = ("dandelion pipeline:", "  dataset", "  training", "  model", "  promotion")
    return "\n".join("    " + ln.strip() for ln in output.splitlines() if ln.startswith(keep))


def main() -> None:
    if not (GREENR / "dandelion").is_dir():
        raise SystemExit(f"reference dataset not found at {GREENR} (set DANDELION_TEST_DATASET)")
    print(f"cpus: {os.cpu_count()}, reference dataset: {GREENR} (served on loopback HTTP)")
    url, server = _serve(GREENR)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
            cold, rc, out = _pipeline(Path(tmp) / "pipeline", url)
            print(f"pipeline, cold (DB migration + airflow dags test): {cold:7.1f} s  rc={rc}")
            print(_summary_lines(out))
            if rc != 0:
                print(out[-3000:])
            again, rc2, out2 = _pipeline(Path(tmp) / "pipeline", url)
            print(f"pipeline, re-run (nothing changed):                {again:7.1f} s  rc={rc2}")
            print(_summary_lines(out2))
            base = _baseline_in_child(Path(tmp) / "baseline", url)
            laps = ", ".join(f"{k} {v:.1f} s" for k, v in base["laps"].items())
            print(
                f"baseline, same stages in-process:                  {base['seconds']:7.1f} s  "
                f"({laps}; test accuracy {base['test_accuracy']:.4f}; "
                f"{base['process_seconds']:.1f} s with interpreter start and imports)"
            )
    finally:
        server.shutdown()
        server.server_close()
    overhead = cold - base["process_seconds"]
    print(
        f"orchestration overhead (Airflow + Papermill + kernels): {overhead:.1f} s "
        f"(pipeline / baseline process = {cold / base['process_seconds']:.2f}x)"
    )
    print(f"re-run / cold = {again / cold:.2f}")
    verdict = "MET" if cold <= TARGET_S and rc == 0 else "MISSED"
    print(f"target: whole pipeline <= {TARGET_S:.0f} s on 2 cores -> {verdict} ({cold:.1f} s)")


if __name__ == "__main__":
    main()
