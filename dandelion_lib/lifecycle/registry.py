"""MLflow tracking and model registry: logging models, aliases and model URIs.

A logged dandelion model is an MLflow ``keras`` flavor model whose MLmodel ``metadata``
carries everything a server needs besides the weights:

* ``feature_spec`` — :meth:`dandelion_lib.core.features.FeatureSpec.to_dict`;
* ``drift_reference`` — :func:`dandelion_lib.lifecycle.monitoring.build_reference` of the training split;
* ``metrics`` — test metrics of the run (e.g. ``test_accuracy``);
* ``dataset_version`` — the dataset version it was trained on;
* ``openset`` — :meth:`dandelion_lib.training.openset.OpenSetDetector.to_dict` (method, threshold,
  retention...) of the open-set detector saved beside the Keras model as ``openset.npz``
  (``None`` for a model without one);
* ``runtime`` — :class:`dandelion_lib.serving.runtime.RuntimeRecord` of the ONNX Runtime artifacts
  (FP32 and INT8) saved beside it in ``runtime/``, with their parity against Keras.

The model maps float32 RGB pixels ``(N, size, size, 3)`` in [0, 255] to class
probabilities ``(N, len(labels))`` (softmax, label order of the feature spec).

Its one job: talk to MLflow's tracking server and registry (configure, log a model, register
a ``challenger``, read aliases). Deciding and moving ``champion`` is
:mod:`dandelion_lib.lifecycle.promotion`'s job.
"""

from __future__ import annotations

import contextlib
import shutil
import types
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.serving import runtime
from dandelion_lib.training.openset import ARTIFACT_NAME, OpenSetDetector

CHALLENGER = "challenger"
CHAMPION = "champion"


def model_uri(name: str, alias: str = CHAMPION) -> str:
    """``models:/<name>@<alias>``."""
    return f"models:/{name}@{alias}"


def configure_mlflow(settings: Settings) -> Any:
    """Point MLflow at the settings' tracking/registry URI; returns an ``MlflowClient``."""
    import mlflow
    from mlflow import MlflowClient

    uri = settings.resolved_tracking_uri
    if uri.startswith("sqlite:///"):
        settings.workdir_path.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def use_experiment(settings: Settings) -> str:
    """Make the settings' experiment the active one (creating it if needed); returns its id.

    On the embedded SQLite backend a new experiment keeps its artifacts under the work
    directory (``<workdir>/mlartifacts``); MLflow's default would be ``./mlruns`` in
    whatever the current directory is. A tracking server decides for itself.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = settings.resolved_tracking_uri
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(settings.tracking.experiment) is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (settings.workdir_path / "mlartifacts").as_uri()
        with contextlib.suppress(MlflowException):  # created meanwhile by another process
            client.create_experiment(settings.tracking.experiment, artifact_location=location)
    return str(mlflow.set_experiment(settings.tracking.experiment).experiment_id)


def _pip_requirements() -> list[str]:
    """Pinned serving requirements (skips MLflow's slow requirement inference)."""
    reqs = []
    for dists in (("mlflow",), ("keras",), ("tensorflow-cpu", "tensorflow"), ("numpy",)):
        for dist in dists:  # the first installed alternative
            try:
                reqs.append(f"{dist}=={metadata.version(dist)}")
                break
            except metadata.PackageNotFoundError:
                continue
    return reqs


def _save_keras_flavor(path: str, **kwargs: Any) -> None:
    """``mlflow.keras.save_model`` into a folder created first.

    The keras flavor of this MLflow release writes the input example before creating the
    model folder, so ``mlflow.keras.log_model(..., input_example=...)`` fails; creating the
    folder first is all it needs.
    """
    import mlflow

    kwargs.pop("validate_serving_input", None)
    detector = kwargs.pop("detector", None)
    runtime_dir = kwargs.pop("runtime_dir", None)
    Path(path).mkdir(parents=True, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)
    if detector is not None:
        detector.save(Path(path) / ARTIFACT_NAME)
    if runtime_dir is not None:
        shutil.copytree(runtime_dir, Path(path) / runtime.DIR)


def log_keras_model(
    model: Any,
    *,
    feature_spec: dict[str, Any],
    drift_reference: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    dataset_version: str | None = None,
    registered_model_name: str | None = None,
    input_example: Any = None,
    detector: OpenSetDetector | None = None,
    runtime_dir: Path | None = None,
    runtime_record: dict[str, Any] | None = None,
) -> Any:
    """Log a Keras model (inside an active MLflow run) and register a new version.

    The model is stored with its signature, an input example (the given one, else a black
    image) and the dandelion metadata; an open-set ``detector`` is saved beside the Keras
    model as ``openset.npz`` and its parameters go into the metadata (``openset``); the
    runtime artifacts built by :func:`dandelion_lib.serving.runtime.build` in ``runtime_dir`` are
    copied to ``runtime/`` and their record goes into the metadata (``runtime``). Returns
    the ``ModelVersion`` (or the ``ModelInfo`` when not registering).
    """
    from mlflow.models import Model, infer_signature

    example = _input_example(model, int(feature_spec["image_size"]), input_example)
    output = np.asarray(model(example, training=False))
    signature = infer_signature(example, output)
    flavor = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_flavor)
    info = Model.log(
        artifact_path=None,
        name="model",
        flavor=flavor,
        model=model,
        signature=signature,
        input_example=example,
        # The example is checked by the tests that load the model back; validating it here
        # would load the model a second time.
        validate_serving_input=False,
        pip_requirements=_pip_requirements(),
        registered_model_name=registered_model_name,
        detector=detector,
        runtime_dir=runtime_dir,
        metadata={
            "openset": detector.to_dict() if detector is not None else None,
            "runtime": runtime_record,
            "feature_spec": feature_spec,
            "drift_reference": drift_reference or {},
            "metrics": metrics or {},
            "dataset_version": dataset_version,
        },
    )
    if registered_model_name is None:
        return info
    return _registered_version(info, registered_model_name)


def _input_example(model: Any, size: int, given: Any) -> np.ndarray:
    """The input example to log (the given one, else a black image), after checking that
    the model takes the feature spec's input shape."""
    expected = (size, size, 3)
    shape = tuple(model.input_shape[1:])
    if any(got not in (None, want) for want, got in zip(expected, shape, strict=True)):
        raise DandelionError(
            f"the model takes inputs of shape {shape}, but its feature spec says {expected}"
        )
    if given is not None:
        return np.asarray(given, dtype=np.float32)
    return np.zeros((1, size, size, 3), dtype=np.float32)


def _registered_version(info: Any, name: str) -> Any:
    """The ``ModelVersion`` that logging ``info`` registered under ``name``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if getattr(info, "registered_model_version", None) is not None:
        return client.get_model_version(name, str(info.registered_model_version))
    versions = client.search_model_versions(f"name='{name}'")
    for mv in versions:
        if mv.source and info.model_uri and mv.run_id == info.run_id:
            return mv
    return max(versions, key=lambda mv: int(mv.version))


def logged_dataset_version(name: str, version: str) -> str | None:
    """The dataset version a registered version records in its metadata (reads only its
    MLmodel file, not the weights)."""
    import mlflow

    info = mlflow.models.get_model_info(f"models:/{name}/{version}")
    value = (info.metadata or {}).get("dataset_version")
    return str(value) if value else None


def get_alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The ``ModelVersion`` an alias points to, or None when the alias or model is missing."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_challenger(client: Any, name: str, version: str, dataset_version: str) -> None:
    """Point ``challenger`` at a newly registered version and tag its dataset version."""
    client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, "dataset_version", dataset_version)
