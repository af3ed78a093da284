"""What a downloaded model version holds, read for the Predictor: its metadata, registry
name and tags, the runtime session to serve (ONNX Runtime in a precision, else Keras), the
FP32 session that rechecks INT8 near a boundary, and the open-set detector. Every failure is a
:class:`ModelUnavailableError` with one user-facing line, or a warning and a fallback.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.serving import runtime as runtime_lib
from dandelion_lib.serving.explain import Explainer, ExplanationUnavailableError
from dandelion_lib.serving.recheck import Recheck
from dandelion_lib.training.openset import ARTIFACT_NAME, OpenSetDetector, OpenSetError

log = logging.getLogger(__name__)


class ModelUnavailableError(DandelionError):
    """The model URI cannot be resolved or loaded (one user-facing line)."""


@dataclass(frozen=True)
class Loaded:
    runtime: str
    precision: str
    forward: Any = None
    note: str | None = None
    explainer: Explainer | None = None
    explain_note: str | None = "explanations need the model version's ONNX runtime"
    recheck: Recheck | None = None

    def fields(self) -> dict[str, Any]:
        """The Predictor's fields that come from the runtime loaded."""
        return {
            "explainer": self.explainer,
            "explain_unavailable": self.explain_note,
            "recheck": self.recheck,
        }


def load_runtime(
    uri: str, local: Path, runtime: str, precision: str, settings: Settings, threads: int
) -> Loaded:
    """The ONNX session to serve (``forward`` None: load Keras), following ``runtime``, and
    with INT8 the FP32 session that rechecks it (:func:`load_recheck`)."""
    max_batch = settings.serving.inference_batch_max
    if runtime == "keras":
        return Loaded("keras", "fp32")
    tried: list[str] = []
    for wanted in dict.fromkeys((precision, "fp32")):
        try:
            forward, record = runtime_lib.load(local, wanted, threads=threads, max_batch=max_batch)
        except runtime_lib.RuntimeArtifactError as exc:
            if runtime == "onnx":
                raise ModelUnavailableError(f"cannot load model {uri}: {exc}") from exc
            tried.append(str(exc))
            continue
        note = "; ".join(tried) or None
        if note:
            log.warning("model %s: serving %s ONNX instead: %s", uri, wanted, note)
        try:
            explainer, explain_note = runtime_lib.load_explainer(local, record), None
        except ExplanationUnavailableError as exc:
            explainer, explain_note = None, str(exc)
        recheck = load_recheck(local, wanted, settings, threads)
        return Loaded("onnx", wanted, forward, note, explainer, explain_note, recheck)
    note = "; ".join(dict.fromkeys(tried))
    log.warning("model %s: serving the Keras model: %s", uri, note)
    return Loaded("keras", "fp32", None, note)


def load_recheck(local: Path, precision: str, settings: Settings, threads: int) -> Recheck | None:
    """INT8 ONNX served (``precision``): the FP32 session that rechecks photos near a boundary
    (None: FP32 served, the margin is 0, or the FP32 artifact cannot be loaded). It runs one photo
    per call: ONNX Runtime's arena keeps the peak of the largest batch a session has run, and
    batches of 8 would double the API's memory (docs/model.md)."""
    serving = settings.serving
    if precision != "int8" or serving.int8_recheck_margin <= 0:
        return None
    try:
        forward, _ = runtime_lib.load(local, "fp32", threads=threads, max_batch=1)
    except runtime_lib.RuntimeArtifactError as exc:
        log.warning("INT8 served without an FP32 recheck: %s", exc)
        return None
    return Recheck(forward, serving.int8_recheck_margin, serving.int8_recheck_confidence_margin)


def load_keras(uri: str, local: Path) -> Any:
    """The version's Keras model (the fallback runtime; needs TensorFlow)."""
    from mlflow.exceptions import MlflowException

    try:
        import mlflow.keras
    except ImportError as exc:  # an image without TensorFlow
        raise ModelUnavailableError(
            f"cannot load model {uri}: it has no usable ONNX artifact and Keras is not "
            f"installed here ({exc})"
        ) from exc
    try:
        return mlflow.keras.load_model(str(local))
    except (MlflowException, OSError, ValueError, zipfile.BadZipFile) as exc:
        # Keras says "File not found" for any file that is not a zip archive.
        problem = _model_file_problem(local)
        if problem is None:
            raise
        raise ModelUnavailableError(f"cannot load model {uri}: {problem}") from exc


def read_metadata(local: Path) -> dict[str, Any]:
    """The dandelion metadata of a downloaded model version (its MLmodel file's
    ``metadata``). Read as YAML: ``mlflow.models.Model.load`` would import pandas for the
    signature, which the API image does not carry."""
    import yaml

    path = local / "MLmodel"
    if not path.is_file():
        raise ValueError("it is not an MLflow model (no MLmodel file)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"its MLmodel file cannot be read: {exc}") from exc
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) else {}


def _model_file_problem(local: Path) -> str | None:
    """What is wrong with the downloaded Keras model file, when something is: missing, not a
    zip archive (truncated or overwritten) or a member failing its CRC check (corrupt)."""
    files = sorted(local.rglob("*.keras"))
    if not files:
        return "the model file (model.keras) is missing from the model version"
    for path in files:
        name = path.relative_to(local).as_posix()
        size = path.stat().st_size
        if not zipfile.is_zipfile(path):
            return f"the model file {name} is corrupt (not a .keras zip archive; {size:,} bytes)"
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f"the model file {name} is corrupt ({exc})"
        if bad is not None:
            return f"the model file {name} is corrupt (its member {bad} fails its CRC check)"
    return None


def load_detector(local: Path, meta: dict[str, Any]) -> OpenSetDetector | None:
    """The model's open-set detector, or None for a model logged without one."""
    if not meta.get("openset"):
        return None
    path = local / ARTIFACT_NAME
    if not path.is_file():
        raise OpenSetError(
            f"the model's metadata names an open-set detector but {ARTIFACT_NAME} is missing"
        )
    return OpenSetDetector.load(path)


def resolve(uri: str) -> tuple[str | None, str | None, dict[str, str]]:
    """Registered name, version and version tags behind a ``models:/`` URI (None, None, {}
    for other URIs)."""
    if not uri.startswith("models:/"):
        return None, None, {}
    from mlflow import MlflowClient

    ref = uri[len("models:/") :]
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = ref.partition("/")
        if not number:
            return name, None, {}
        mv = client.get_model_version(name, number)
    return name, str(mv.version), dict(mv.tags or {})
