"""The saved scores of a model version: ``scores.json`` in the version's MLflow run.

Written once by the scoring step (:mod:`dandelion_lib.lifecycle.scoring`), read back by the
promotion gate, notebook 03 and the run summary instead of scoring the model again. The
record (a JSON object):

* ``version``, ``dataset_version`` (whose test split was scored), ``benchmark_version``,
  ``serving_runtime`` (the setting it was scored under), ``runtime`` and ``runtime_note``
  (what ran FP32: ``onnx``, or ``keras`` and why), ``scored_at``;
* ``reports``: ``fp32`` and ``int8`` (``null`` without an INT8 artifact), each an
  :meth:`dandelion_lib.lifecycle.metrics.EvaluationReport.to_dict`;
* ``benchmark`` and ``benchmark_precision``: the report on the benchmark split when it is
  another dataset version than ``dataset_version``.
* ``agreement``: INT8 versus FP32 on the dataset version's photos
  (:meth:`dandelion_lib.lifecycle.agreement.Agreement.to_dict`; ``null`` without INT8, absent
  from records saved before it was measured).

Light on purpose (JSON, and an MLflow client passed in): the run summary reads it in the
process that parses the DAG files.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

ARTIFACT = "scores.json"

HEADLINE = ("right_answers", "accuracy", "ood_unknown_share", "max_source_unknown_share")
"""The figures of a saved report the run summary shows."""


def save(client: Any, run_id: str, record: dict[str, Any]) -> None:
    """Write ``record`` as the run's ``scores.json`` (replacing an earlier one)."""
    client.log_text(run_id, json.dumps(record, sort_keys=True, default=_native), ARTIFACT)


def _native(value: Any) -> Any:
    """A numpy scalar or array as the Python value JSON can hold."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def load(client: Any, run_id: str) -> dict[str, Any] | None:
    """The run's saved scores (None when it has none or they cannot be read)."""
    from mlflow.exceptions import MlflowException

    try:
        if not any(a.path == ARTIFACT for a in client.list_artifacts(run_id)):
            return None
        with tempfile.TemporaryDirectory(prefix="dandelion-scores-") as tmp:
            path = client.download_artifacts(run_id, ARTIFACT, dst_path=tmp)
            record: dict[str, Any] = json.loads(Path(path).read_text())
    except (MlflowException, OSError, ValueError):
        return None
    return record


def headline(record: dict[str, Any], precision: str) -> dict[str, float | None]:
    """:data:`HEADLINE` figures of the ``precision`` report (FP32 when there is no such
    report); None for a figure that is absent or NaN."""
    reports = record.get("reports") or {}
    report = reports.get(precision) or reports.get("fp32") or {}
    metrics = report.get("metrics") or {}
    out: dict[str, float | None] = {}
    for name in HEADLINE:
        value = metrics.get(name)
        if isinstance(value, int | float) and not math.isnan(value):
            out[name] = float(value)
        else:
            out[name] = None
    return out
