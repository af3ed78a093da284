"""MLflow tracking and model registry: logging models, aliases and model URIs.

A logged dandelion model is an MLflow ``keras`` flavor model whose MLmodel ``metadata``
carries everything a server needs besides the weights:

* ``feature_spec`` — :meth:`dandelion_lib.features.FeatureSpec.to_dict`;
* ``drift_reference`` — :func:`dandelion_lib.monitoring.build_reference` of the training split;
* ``metrics`` — test metrics of the run (e.g. ``test_accuracy``);
* ``dataset_version`` — the dataset version it was trained on.

The model maps float32 RGB pixels ``(N, size, size, 3)`` in [0, 255] to class
probabilities ``(N, len(labels))`` (softmax, label order of the feature spec).

Promotion (:func:`promote`, ``dandelion promote``): the ``challenger`` and the current
``champion`` are re-scored on the same test split; :func:`promotion_gate` decides (accuracy
floor, tolerance versus the champion); the decision and its numbers become ``promotion.*``
tags on the challenger's model version, and only the ``champion`` alias moves.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Any

from dandelion_lib.config import Settings, get_settings
from dandelion_lib.errors import DandelionError

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


def use_experiment(settings: Settings | None = None) -> str:
    """Make the settings' experiment the active one (creating it if needed); returns its id.

    On the embedded SQLite backend a new experiment keeps its artifacts under the work
    directory (``<workdir>/mlartifacts``); MLflow's default would be ``./mlruns`` in
    whatever the current directory is. A tracking server decides for itself.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    settings = settings or get_settings()
    uri = settings.resolved_tracking_uri
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(settings.experiment) is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (settings.workdir_path / "mlartifacts").as_uri()
        with contextlib.suppress(MlflowException):  # created meanwhile by another process
            client.create_experiment(settings.experiment, artifact_location=location)
    return str(mlflow.set_experiment(settings.experiment).experiment_id)


def _pip_requirements() -> list[str]:
    """Pinned serving requirements (skips MLflow's slow requirement inference)."""
    from importlib import metadata

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
    import os

    import mlflow

    kwargs.pop("validate_serving_input", None)
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


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

    The model is stored with its signature, an input example (the given one, else a black
    image) and the dandelion metadata. Returns the ``ModelVersion`` (or the ``ModelInfo``
    when not registering).
    """
    import types

    import numpy as np
    from mlflow.models import Model, infer_signature

    size = int(feature_spec["image_size"])
    expected = (size, size, 3)
    shape = tuple(model.input_shape[1:])
    if any(got not in (None, want) for want, got in zip(expected, shape, strict=True)):
        raise DandelionError(
            f"the model takes inputs of shape {shape}, but its feature spec says {expected}"
        )
    example = (
        np.asarray(input_example, dtype=np.float32)
        if input_example is not None
        else np.zeros((1, size, size, 3), dtype=np.float32)
    )
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
    if getattr(info, "registered_model_version", None) is not None:
        return client.get_model_version(registered_model_name, str(info.registered_model_version))
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


# --------------------------------------------------------------------------------------
# Promotion: challenger -> champion, only through the gate; aliases move, versions never change
# --------------------------------------------------------------------------------------

TAG_PREFIX = "promotion."


class PromotionError(DandelionError):
    """Promotion cannot be decided (no challenger, no dataset version...)."""


@dataclass(frozen=True)
class GateDecision:
    """The promotion gate's verdict and the numbers behind it."""

    promote: bool
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None
    floor: float
    tolerance: float


def promotion_gate(
    challenger_accuracy: float,
    champion_accuracy: float | None,
    *,
    floor: float,
    tolerance: float,
) -> GateDecision:
    """Promote when accuracy >= ``floor`` and not worse than the champion by more than
    ``tolerance`` (both measured on the same test split)."""

    def decide(ok: bool, reason: str) -> GateDecision:
        return GateDecision(ok, reason, challenger_accuracy, champion_accuracy, floor, tolerance)

    eps = 1e-9  # accuracies are ratios of counts: exact ties must not fail on rounding
    if not challenger_accuracy >= floor - eps:  # also rejects NaN
        return decide(False, f"accuracy {challenger_accuracy:.4f} is below the floor {floor:.4f}")
    if champion_accuracy is None:
        return decide(True, f"accuracy {challenger_accuracy:.4f} >= floor {floor:.4f}; no champion")
    if challenger_accuracy < champion_accuracy - tolerance - eps:
        return decide(
            False,
            f"accuracy {challenger_accuracy:.4f} is worse than the champion's "
            f"{champion_accuracy:.4f} by more than {tolerance:.4f}",
        )
    return decide(
        True,
        f"accuracy {challenger_accuracy:.4f} >= floor {floor:.4f} and within {tolerance:.4f} "
        f"of (or above) the champion's {champion_accuracy:.4f}",
    )


@dataclass
class PromotionResult:
    name: str
    challenger_version: str
    champion_version_before: str | None
    champion_version_after: str | None
    dataset_version: str
    decision: GateDecision
    run_id: str | None = None
    challenger_report: Any = field(default=None, repr=False)
    champion_report: Any = field(default=None, repr=False)

    @property
    def promoted(self) -> bool:
        return self.decision.promote

    def summary(self) -> str:
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        champ = self.champion_version_after or "none"
        return (
            f"{verdict}: {self.name} version {self.challenger_version} on dataset "
            f"{self.dataset_version}: {self.decision.reason}. Champion is now version {champ}."
        )


def promote(
    settings: Settings | None = None,
    *,
    candidate_alias: str = CHALLENGER,
    dataset_version: str | None = None,
    store: Any = None,
    floor: float | None = None,
    tolerance: float | None = None,
) -> PromotionResult:
    """Re-score the candidate and the current champion on the same test split, apply the
    gate, record the decision as model-version tags and, if it passes, move ``champion``.

    The test split is the one of ``dataset_version`` (default: the candidate's own
    training dataset version). A champion that cannot be loaded or scored any more is
    recorded as such and the gate then applies the floor only.
    """
    from datetime import UTC, datetime

    import mlflow

    from dandelion_lib import evaluate
    from dandelion_lib.dataset import load_manifest
    from dandelion_lib.predict import ModelUnavailableError, Predictor
    from dandelion_lib.storage import open_store

    settings = settings or get_settings()
    client = configure_mlflow(settings)
    name = settings.model_name
    floor = settings.promotion_floor if floor is None else floor
    tolerance = settings.promotion_tolerance if tolerance is None else tolerance
    candidate = get_alias_version(client, name, candidate_alias)
    if candidate is None:
        raise PromotionError(
            f"no version of model {name!r} has the alias {candidate_alias!r}; train one first"
        )
    champion = get_alias_version(client, name, CHAMPION)
    challenger = Predictor.load(f"models:/{name}/{candidate.version}")
    version = dataset_version or challenger.dataset_version
    if not version:
        raise PromotionError(
            f"{name} version {candidate.version} records no dataset version; pass one explicitly"
        )
    store = store or open_store(settings=settings)
    manifest = load_manifest(store, version)
    report = evaluate.evaluate_split(challenger, store, version, manifest=manifest)

    champion_acc: float | None = None
    champion_report = None
    champion_note = ""
    if champion is not None and str(champion.version) == str(candidate.version):
        champion_acc = report.accuracy
    elif champion is not None:
        try:
            current = Predictor.load(f"models:/{name}/{champion.version}")
            champion_report = evaluate.evaluate_split(current, store, version, manifest=manifest)
            champion_acc = champion_report.accuracy
        except (ModelUnavailableError, evaluate.EvaluationError) as exc:
            champion_note = f" (champion version {champion.version} could not be re-scored: {exc})"
    decision = promotion_gate(report.accuracy, champion_acc, floor=floor, tolerance=tolerance)
    if champion_note:
        decision = GateDecision(**{**decision.__dict__, "reason": decision.reason + champion_note})

    use_experiment(settings)
    with mlflow.start_run(run_name=f"promote-v{candidate.version}") as run:
        mlflow.set_tags(
            {
                "model_name": name,
                "model_version": candidate.version,
                "champion_version": champion.version if champion else "none",
                "dataset_version": version,
                "decision": "promoted" if decision.promote else "rejected",
            }
        )
        mlflow.log_params({"floor": floor, "tolerance": tolerance, "dataset_version": version})
        evaluate.log_report(report, prefix="test_")
        if champion_report is not None:
            mlflow.log_metrics(champion_report.scalar_metrics("champion_test_"))
        run_id = run.info.run_id

    tags = {
        "decision": "promoted" if decision.promote else "rejected",
        "reason": decision.reason,
        "challenger_accuracy": f"{decision.challenger_accuracy:.6f}",
        "champion_accuracy": "none"
        if decision.champion_accuracy is None
        else f"{decision.champion_accuracy:.6f}",
        "champion_version": champion.version if champion else "none",
        "floor": str(floor),
        "tolerance": str(tolerance),
        "dataset_version": version,
        "test_images": str(report.metrics["n"]),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate.version, TAG_PREFIX + key, value)
    after = champion.version if champion else None
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
        after = str(candidate.version)
    return PromotionResult(
        name=name,
        challenger_version=str(candidate.version),
        champion_version_before=champion.version if champion else None,
        champion_version_after=after,
        dataset_version=version,
        decision=decision,
        run_id=run_id,
        challenger_report=report,
        champion_report=champion_report,
    )


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion promote``."""
    parser.add_argument("--alias", default=CHALLENGER, help="alias of the candidate version")
    parser.add_argument(
        "--dataset-version", help="test split to score on (default: the candidate's dataset)"
    )
    parser.add_argument("--floor", type=float, help="minimum accuracy (DANDELION_PROMOTION_FLOOR)")
    parser.add_argument(
        "--tolerance", type=float, help="allowed drop vs champion (DANDELION_PROMOTION_TOLERANCE)"
    )


def cli(args: argparse.Namespace) -> int:
    result = promote(
        candidate_alias=args.alias,
        dataset_version=args.dataset_version,
        floor=args.floor,
        tolerance=args.tolerance,
    )
    print(result.summary())
    return 0
