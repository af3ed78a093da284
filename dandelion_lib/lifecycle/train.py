"""Training: a dataset version from the store -> a registered MLflow model (alias ``challenger``).

Its one job: turn a dataset version into a registered ``challenger``. :func:`train` reads top
to bottom as named steps (load data, load pixels, cache features and fit the head, refit,
optional pixel training, fit the open-set detector, evaluate, log to MLflow, register the
challenger); it never moves ``champion`` (:mod:`dandelion_lib.lifecycle.promotion` does).
The recipe itself lives in the training layer: the data it reads
(:mod:`dandelion_lib.training.inputs`), the backbone features
(:mod:`dandelion_lib.training.extraction`) and the fitting
(:mod:`dandelion_lib.training.fitting`); this module keeps what needs MLflow, the serving
path (the Predictor, the runtime build), evaluation and the
registry.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Metric

from dandelion_lib.core.config import Settings, cpu_limit
from dandelion_lib.core.features import STAT_COLUMNS
from dandelion_lib.core.storage import open_store
from dandelion_lib.data import dataset
from dandelion_lib.lifecycle import evaluate, monitoring, registry, scorecard, scoring
from dandelion_lib.lifecycle.extractor import feature_extractor, log_extraction
from dandelion_lib.lifecycle.figures import log_learning_curves, log_report
from dandelion_lib.serving import runtime
from dandelion_lib.serving.loading import ModelUnavailableError
from dandelion_lib.serving.predict import Predictor
from dandelion_lib.training import extraction, openset
from dandelion_lib.training import model as model_lib
from dandelion_lib.training.config import TrainConfig
from dandelion_lib.training.fitting import EpochLog, Laps, fit_cached, fit_open_set, fit_pixels
from dandelion_lib.training.inputs import StoredPixels, TrainingData, load_data, load_pixels


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    model_version: str | None
    dataset_version: str
    metrics: dict[str, float]
    history: dict[str, list[float]]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)
    report: Any = field(default=None, repr=False)


def _log_epochs(history: dict[str, list[float]]) -> None:
    """Every phase's per-epoch metrics, one MLflow step per epoch."""
    run = mlflow.active_run()
    if run is None:
        return
    now = int(time.time() * 1000)
    metrics = [
        Metric(key=k, value=v, timestamp=now, step=i)
        for k, values in history.items()
        if k != "phase"
        for i, v in enumerate(values)
    ]
    client = MlflowClient()
    for start in range(0, len(metrics), 900):
        client.log_batch(run.info.run_id, metrics=metrics[start : start + 900])


def _prepare(config: TrainConfig, data: TrainingData, store: Any, laps: Laps) -> model_lib.Backbone:
    """Seeds, then the backbone (first: a missing download fails before any image is read),
    then every split's model inputs (read from the store when a step walks them)."""
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    laps.restart()
    backbone = model_lib.build_backbone(config.backbone, config.weights, data.spec.image_size)
    laps.lap("build_backbone")
    load_pixels(data, store)
    laps.lap("load_images")
    return backbone


def _fit_frozen(
    config: TrainConfig,
    backbone: model_lib.Backbone,
    data: TrainingData,
    log: EpochLog,
    laps: Laps,
    *,
    store: Any,
    settings: Settings,
) -> Any:
    """Steps 3-4 on the frozen backbone (:func:`~dandelion_lib.training.fitting.fit_cached`),
    through the feature store when ``feature_cache`` is on; logs how many features were
    cached and computed, and which runtime extracted them."""
    fstore = (
        extraction.open_feature_store(store, data.spec, backbone)
        if settings.training.feature_cache
        else None
    )
    extractor = feature_extractor(backbone, settings, cache=fstore)
    head, counts = fit_cached(config, backbone, data, extractor, log, laps, fstore=fstore)
    mlflow.log_metrics({k: float(v) for k, v in counts.items()})
    mlflow.log_param("feature_store_key", fstore.key if fstore is not None else "None")
    log_extraction(extractor)
    return head


def _fit_model(
    config: TrainConfig,
    backbone: model_lib.Backbone,
    data: TrainingData,
    log: EpochLog,
    laps: Laps,
    *,
    store: Any,
    settings: Settings,
) -> Any:
    """Steps 3-5: the head (fitted on cached features, or untrained for end-to-end
    training), the assembled model and its optional training on pixels; logs every epoch."""
    augmenter = extraction.make_augmenter(config)
    end_to_end = not backbone.pretrained  # model.is_pretrained: small_cnn never is
    if end_to_end:
        head = model_lib.build_head(
            backbone.feature_dim, len(data.labels), config.dropout, config.seed, l2=config.l2
        )
    else:
        head = _fit_frozen(config, backbone, data, log, laps, store=store, settings=settings)
    full = model_lib.assemble(backbone, head, freeze_batchnorm=not end_to_end)
    fit_pixels(config, backbone, full, data, augmenter, log, laps, end_to_end=end_to_end)
    _log_epochs(log.history)
    return full


def _fit_open_set(
    config: TrainConfig, full: Any, data: TrainingData, laps: Laps
) -> openset.OpenSetDetector | None:
    """Step 6 (:func:`~dandelion_lib.training.fitting.fit_open_set`) on the served
    features; logs the method, the negatives and the threshold."""
    served = Predictor(model=full, spec=data.spec)
    detector = fit_open_set(config, data, served.features)
    if detector is None:
        return None
    mlflow.log_params(
        {
            "openset_method_resolved": detector.method,
            "negatives_train": len(data.negative_pixels.get("train", ())),
            "negatives_test": len(data.negatives.get("test", ())),
            "openset_sources": data.source_count,
        }
    )
    mlflow.log_metric("openset_threshold", float(detector.threshold or 0.0))
    if detector.floor is not None:
        mlflow.log_metric("openset_floor", float(detector.floor))
    laps.lap("fit_open_set")
    return detector


def log_validation(
    full: Any,
    data: TrainingData,
    history: dict[str, list[float]],
    *,
    log_val: bool,
    detector: openset.OpenSetDetector | None = None,
) -> None:
    """Step 7: the learning curves and, with ``log_val``, the val split's figures (Keras,
    with the open-set detector and the negatives' val split). The test split is scored once,
    on the served runtime, by :func:`score_model`."""
    if log_val:  # the refit head has seen val: its val figures would say nothing
        predictor = Predictor(model=full, spec=data.spec, detector=detector)
        report = evaluate.evaluate_arrays(
            predictor,
            data.pixels["val"],
            data.y["val"],
            data.splits["val"],
            source=f"dataset {data.version} (val split)",
            negatives=(data.negative_pixels.get("val"), data.negative_kinds("val")),
        )
        mlflow.log_metrics(report.scalar_metrics("val_final_"))
    log_learning_curves(history)


def log_run_inputs(config: TrainConfig, store: Any, data: TrainingData) -> None:
    """Step 8a: the configuration, the dataset version and the split sizes, to MLflow."""
    mlflow.log_params(config.to_params() | {"dataset_version_resolved": data.version})
    _log_dataset(store, data.manifest, data.version)
    mlflow.log_params(
        {f"images_{s}": len(rows) for s, rows in data.splits.items()}
        | {"feature_spec_version": data.spec.version, "image_size": data.spec.image_size}
    )


def build_runtime(
    full: Any, data: TrainingData, settings: Settings, out_dir: Path
) -> runtime.RuntimeRecord:
    """Step 8b': the served runtime artifacts (FP32 ONNX, checked against Keras on the
    validation split — or the test split when there is no validation split — and INT8
    calibrated on the first ``int8_calibration_images`` training images). A failed FP32
    parity check stops registration (:class:`dandelion_lib.serving.runtime.RuntimeParityError`)."""
    parity = data.pixels["val"] if len(data.pixels.get("val", ())) else data.pixels["test"]
    calibration = data.pixels["train"][: settings.promotion.int8_calibration_images]
    record = runtime.build(
        full,
        data.spec.image_size,
        out_dir,
        keras_forward=runtime.keras_forward(full, data.spec.image_size),
        parity_pixels=parity.as_float32(),  # read from the store batch by batch
        calibration_pixels=np.asarray(calibration, dtype=np.float32) if len(calibration) else None,
        max_batch=settings.serving.inference_batch_max,
        threads=settings.serving.inference_threads or cpu_limit(),
    )
    mlflow.log_dict(record.to_dict(), "runtime_parity.json")
    for precision, figures in record.parity.items():
        mlflow.log_metric(f"runtime_{precision}_max_abs_diff", float(figures["max_abs_diff"]))
        mlflow.log_metric(f"runtime_{precision}_label_flips", float(figures["label_flips"]))
    return record


def score_model(
    full: Any,
    data: TrainingData,
    settings: Settings,
    local: Path,
    *,
    store: Any,
    detector: openset.OpenSetDetector | None,
    register: bool,
) -> scoring.Scores:
    """Step 8c: the test split scored once, as the model will be served: the runtime just
    built under ``local`` (FP32, and with ``register`` INT8 with its agreement and the
    benchmark split: what the promotion gate reads, :mod:`.scoring`). Logged with its
    figures; its ``test_*`` metrics are FP32's."""
    split = scoring.Split.of(store, data.version, settings)
    fp32 = Predictor.from_folder(
        local,
        settings,
        spec=data.spec,
        precision="fp32",
        runtime=settings.serving.serving_runtime,
        model=full,
        detector=detector,
    )
    int8 = None
    if register and fp32.runtime == "onnx":
        try:
            int8 = Predictor.from_folder(
                local, settings, spec=data.spec, precision="int8", detector=detector
            )
        except ModelUnavailableError:
            int8 = None  # the gate serves FP32; promotion says why
    scores = scoring.score_predictors(settings, fp32, int8, split, "", benchmark=register)
    pixels = StoredPixels(store, scores.fp32.predictions, data.spec)
    log_report(scores.fp32, pixels, prefix="test_")
    return scores


def log_model(
    full: Any,
    data: TrainingData,
    settings: Settings,
    *,
    store: Any,
    register: bool,
    detector: openset.OpenSetDetector | None = None,
) -> tuple[str, str | None, scoring.Scores]:
    """Step 8b: log the model (and its open-set detector) with its metadata and test
    figures (:func:`score_model`); with ``register``, register it as the ``challenger`` and
    save its scores with the run (nothing more: promotion is
    :mod:`dandelion_lib.lifecycle.promotion`'s job). Returns the model URI, the registered
    version and the scores."""
    reference = monitoring.build_reference(data.splits["train"][list(STAT_COLUMNS)])
    with tempfile.TemporaryDirectory(prefix="dandelion-runtime-") as tmp:
        record = build_runtime(full, data, settings, Path(tmp) / runtime.DIR)
        scores = score_model(
            full, data, settings, Path(tmp), store=store, detector=detector, register=register
        )
        logged = registry.log_keras_model(
            full,
            feature_spec=data.spec.to_dict(),
            drift_reference=reference,
            metrics=scores.fp32.scalar_metrics("test_"),
            dataset_version=data.version,
            registered_model_name=settings.tracking.model_name if register else None,
            input_example=data.pixels["test"][:1].astype(np.float32),
            detector=detector,
            runtime_dir=Path(tmp) / runtime.DIR,
            runtime_record=record.to_dict(),
        )
    if not register:
        return logged.model_uri, None, scores
    version = str(logged.version)
    client = mlflow.MlflowClient()
    uri = f"models:/{settings.tracking.model_name}/{version}"
    scores = scores.named(version, uri)
    scorecard.save(client, logged.run_id, scores.to_record())
    registry.register_challenger(client, settings.tracking.model_name, version, data.version)
    return uri, version, scores


def train(
    config: TrainConfig,
    settings: Settings,
    *,
    store: Any = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train, evaluate on the test split, log everything to MLflow and register the model
    as the ``challenger``. Each step is a function above; this reads them in order."""
    laps = Laps()
    store = store or open_store(settings=settings)
    data = load_data(config, settings, store)
    backbone = _prepare(config, data, store, laps)
    log = EpochLog(sys.stdout.isatty() if progress is None else progress)

    registry.configure_mlflow(settings)
    registry.use_experiment(settings)
    with mlflow.start_run(run_name=f"train-{config.backbone}") as run:
        log_run_inputs(config, store, data)
        full = _fit_model(config, backbone, data, log, laps, store=store, settings=settings)
        detector = _fit_open_set(config, full, data, laps)
        log_val = not backbone.pretrained or not config.refit_with_val
        log_validation(full, data, log.history, log_val=log_val, detector=detector)
        laps.lap("evaluate")
        uri, model_version, scores = log_model(
            full, data, settings, store=store, register=config.register, detector=detector
        )
        report, metrics = scores.fp32, scores.fp32.scalar_metrics("test_")
        laps.lap("log_model")
        seconds = time.perf_counter() - laps.started
        mlflow.log_metrics(
            {"train_seconds": seconds} | {f"seconds_{k}": v for k, v in laps.timings.items()}
        )
        run_id = run.info.run_id

    return TrainResult(
        run_id=run_id,
        model_uri=uri,
        model_version=model_version,
        dataset_version=data.version,
        metrics=metrics,
        history=log.history,
        seconds=seconds,
        timings=laps.timings,
        model=full,
        report=report,
    )


def _log_dataset(store: Any, manifest: pd.DataFrame, version: str) -> None:
    """The dataset version as an MLflow dataset input, with the manifest's digest."""

    key = dataset.manifest_key(version)
    info = store.info(key)
    digest = (info.sha256 if info and info.sha256 else None) or hashlib.sha256(
        pd.util.hash_pandas_object(manifest, index=False).to_numpy().tobytes()
    ).hexdigest()
    source = f"{store.url.rstrip('/')}/{key}"
    with warnings.catch_warnings():
        # MLflow hints about integer columns and ambiguous local sources: not actionable here.
        warnings.simplefilter("ignore", UserWarning)
        try:
            ds = from_pandas(
                manifest,
                source=source,
                targets="label",
                name=f"dandelion@{version}",
                digest=digest[:32],
            )
        except Exception:  # an unknown source scheme: keep the dataset, without its source
            ds = from_pandas(
                manifest, targets="label", name=f"dandelion@{version}", digest=digest[:32]
            )
        mlflow.log_input(
            ds, context="training", tags={"version": version, "manifest_sha256": digest}
        )
    mlflow.set_tags(
        {"dataset_version": version, "dataset_manifest_sha256": digest, "dataset_source": source}
    )
