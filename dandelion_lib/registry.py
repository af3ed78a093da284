"""MLflow tracking and model registry: logging models, aliases and model URIs.

A logged dandelion model is an MLflow ``keras`` flavor model whose MLmodel ``metadata``
carries everything a server needs besides the weights:

* ``feature_spec`` — :meth:`dandelion_lib.features.FeatureSpec.to_dict`;
* ``drift_reference`` — :func:`dandelion_lib.monitoring.build_reference` of the training split;
* ``metrics`` — test metrics of the run (e.g. ``test_accuracy``);
* ``dataset_version`` — the dataset version it was trained on.

The model maps float32 RGB pixels ``(N, size, size, 3)`` in [0, 255] to class
probabilities ``(N, len(labels))`` (softmax, label order of the feature spec).
"""

from __future__ import annotations

from typing import Any

from dandelion_lib.config import Settings, get_settings

CHALLENGER = "challenger"
CHAMPION = "champion"


def model_uri(name: str | None = None, alias: str = CHAMPION) -> str:
    """``models:/<name>@<alias>``."""
    return f"models:/{name or get_settings().model_name}@{alias}"


def configure_mlflow(settings: Settings | None = None) -> Any:
    """Point MLflow at the settings' tracking/registry URI; returns an ``MlflowClient``."""
    import mlflow
    from mlflow import MlflowClient

    settings = settings or get_settings()
    uri = settings.resolved_tracking_uri
    if uri.startswith("sqlite:///"):
        settings.workdir_path.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def log_keras_model(
    model: Any,
    *,
    feature_spec: dict[str, Any],
    drift_reference: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    dataset_version: str | None = None,
    registered_model_name: str | None = None,
    input_example: Any = None,
) -> Any:
    """Log a Keras model (inside an active MLflow run) and register a new version.

    Returns the ``ModelVersion`` (or the ``ModelInfo`` when not registering).
    """
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    size = int(feature_spec["image_size"])
    example = (
        input_example
        if input_example is not None
        else np.zeros((1, size, size, 3), dtype=np.float32)
    )
    output = np.asarray(model(example, training=False))
    signature = infer_signature(example, output)
    info = mlflow.keras.log_model(
        model,
        name="model",
        signature=signature,
        # The keras flavor of this MLflow release fails to write input examples
        # (it saves before creating the model folder); the signature carries the schema.
        registered_model_name=registered_model_name,
        metadata={
            "feature_spec": feature_spec,
            "drift_reference": drift_reference or {},
            "metrics": metrics or {},
            "dataset_version": dataset_version,
        },
    )
    if registered_model_name is None:
        return info
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = client.search_model_versions(f"name='{registered_model_name}'")
    for mv in versions:
        if mv.source and info.model_uri and mv.run_id == info.run_id:
            return mv
    return max(versions, key=lambda mv: int(mv.version))


def get_alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The ``ModelVersion`` an alias points to, or None when the alias or model is missing."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
