"""Train -> register -> promote -> serve, against a real MLflow tracking server
(`mlflow server --workers 1`, SQLite backend, artifacts on the loopback S3 server) with the
dataset in the S3 store as well. The model is trained on the test stand-in backbone
(``stand_in``), in seconds."""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import open_store
from dandelion_lib.data import dataset
from dandelion_lib.data.ingest import ingest
from dandelion_lib.lifecycle import promotion, registry
from dandelion_lib.lifecycle.train import train
from dandelion_lib.serving.predict import Predictor
from dandelion_lib.training.config import TrainConfig


def test_train_register_promote_and_serve_the_champion(
    mlflow_server: str, s3_server: str, s3_bucket: str, greenr_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(
        workdir=tmp_path / "work",
        store_url=f"s3://{s3_bucket}/dandelion",
        s3_endpoint_url=s3_server,
        tracking_uri=mlflow_server,
        experiment="dandelion-integration",
        max_per_class=60,
        # a small subset and the stand-in backbone: the flow is under test here, not the accuracy
        promotion_floor=0.7,
    )
    store = open_store(settings=settings)
    version = ingest(settings, source=str(greenr_dir), store=store, progress=False).version
    manifest = dataset.load_manifest(store, version)

    # The test stand-in backbone (dandelion_lib.training.model.build_stand_in): the flow from
    # training to serving does not depend on the backbone; its quality is tests/model's.
    config = TrainConfig(backbone="stand_in", augment_copies=0, seed=3)
    result = train(config, settings, store=store, progress=False)
    assert result.dataset_version == version
    assert result.metrics["test_accuracy"] >= 0.7  # the stand-in: 0.78 (chance: 0.5)
    client = registry.configure_mlflow(settings)
    challenger = client.get_model_version_by_alias("dandelion", registry.CHALLENGER)
    assert str(challenger.version) == result.model_version

    promoted = promotion.promote(settings, store=store)
    assert promoted.promoted, promoted.decision.reason
    tags = client.get_model_version("dandelion", result.model_version).tags
    assert tags["promotion.decision"] == "promoted"

    # The model's files went through the tracking server to the S3 artifact store.
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"] if b["Name"].startswith("mlflow-")]
    keys = [
        obj["Key"]
        for b in buckets
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b)
        for obj in page.get("Contents", [])
    ]
    assert any(k.endswith("data/model.keras") for k in keys)
    assert any(k.endswith("figures/test_confusion_matrix.png") for k in keys)

    # Served exactly as the API will: the champion alias, bytes in, labels out.
    predictor = Predictor.load(registry.model_uri("dandelion", registry.CHAMPION), settings)
    assert predictor.version == result.model_version
    assert predictor.dataset_version == version
    assert predictor.metrics["test_accuracy"] == result.metrics["test_accuracy"]
    test = manifest[manifest["split"] == "test"]
    images = [store.get_bytes(k) for k in test["key"]]
    predictions = predictor.predict_bytes(images)
    accuracy = np.mean([p.label == lab for p, lab in zip(predictions, test["label"], strict=True)])
    assert abs(accuracy - result.metrics["test_accuracy"]) < 1e-9
    assert all(abs(sum(p.probabilities.values()) - 1.0) < 1e-5 for p in predictions)


def test_promotion_needs_a_challenger(mlflow_server: str, tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path, tracking_uri=mlflow_server, model_name="nobody")
    with pytest.raises(promotion.PromotionError, match="no version of model 'nobody'"):
        promotion.promote(settings)
