"""Promotion through the gate on a real (SQLite) MLflow registry: aliases move, versions
never change, and every decision is recorded on the model version."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dandelion_lib.core.labels import UNKNOWN
from dandelion_lib.lifecycle import promotion, registry
from tests.model.conftest import LITE0_AGREEMENT_PHOTOS, STAND_IN_FLOOR


def _tags(client: Any, version: str) -> dict[str, str]:
    mv = client.get_model_version("dandelion", version)
    return {
        k.removeprefix(promotion.TAG_PREFIX): v
        for k, v in mv.tags.items()
        if k.startswith(promotion.TAG_PREFIX)
    }


@pytest.fixture(scope="module")
def weak_version(model_env: Any, trained: Any) -> str:
    """A registered version that always answers 50/50 (its head is zeroed): a bad challenger."""
    import keras
    import mlflow

    from dandelion_lib.core.features import FeatureSpec

    client = registry.configure_mlflow(model_env.settings)
    weak = keras.models.clone_model(trained.model)
    weak.set_weights(trained.model.get_weights())
    dense = weak.get_layer("head").get_layer("probabilities")
    dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])
    with mlflow.start_run(run_name="weak-model"):
        mv = registry.log_keras_model(
            weak,
            feature_spec=FeatureSpec().to_dict(),
            dataset_version=model_env.version,
            registered_model_name="dandelion",
        )
    assert client.get_model_version("dandelion", str(mv.version)).version is not None
    return str(mv.version)


def _serving(client: Any, version: str) -> dict[str, str]:
    mv = client.get_model_version("dandelion", version)
    return {k.removeprefix("serving."): v for k, v in mv.tags.items() if k.startswith("serving.")}


def _half_test_version(model_env: Any) -> tuple[str, float]:
    """A dataset version (manifest only; ``latest`` does not move) whose test split is every
    other image of the model tests' test split, and the share of its first class."""
    from dandelion_lib.data import dataset

    m = model_env.manifest
    test = m[(m["split"] == "test") & ~dataset.is_negative(m)].sort_values("sha256")
    half = test.iloc[::2]
    version = dataset.compute_version(half)
    model_env.store.put_bytes(dataset.manifest_key(version), dataset.manifest_to_parquet(half))
    return version, float((half["label"] == model_env.settings.labels[0]).mean())


def test_promotion_flow(
    model_env: Any, trained: Any, weak_version: str, mlflow_client: Any
) -> None:
    client = mlflow_client
    good = trained.model_version
    client.set_registered_model_alias("dandelion", registry.CHALLENGER, good)
    try:
        # 1. No champion yet: the challenger passes the floor and becomes champion.
        first = promotion.promote(model_env.settings, store=model_env.store)
        assert first.promoted and first.champion_version_before is None
        assert registry.get_alias_version(client, "dandelion", registry.CHAMPION).version in (
            good,
            int(good),
        )
        tags = _tags(client, good)
        assert tags["decision"] == "promoted"
        assert float(tags["challenger_accuracy"]) == pytest.approx(trained.metrics["test_accuracy"])
        assert tags["champion_version"] == "none" and tags["dataset_version"] == model_env.version
        # the model tests' floor (tests/model/conftest.py: the stand-in tiny model passes it)
        assert tags["floor"] == str(STAND_IN_FLOOR) and tags["test_images"] == "60"
        # The frozen benchmark is the store's first version: here the same test split.
        assert tags["benchmark_dataset_version"] == model_env.version
        assert tags["challenger_benchmark_accuracy"] == tags["challenger_accuracy"]
        assert client.get_run(tags["run_id"]).data.metrics["test_accuracy"] == pytest.approx(
            float(tags["challenger_accuracy"])
        )
        # Judged as served: ONNX Runtime, FP32 scored like Keras, INT8 only when it agrees
        # with FP32 and its test figures stay within what one of the 60 photos moves.
        serving = _serving(client, good)
        assert serving["runtime"] == "onnx" and serving["precision"] in ("fp32", "int8")
        assert float(serving["fp32_accuracy"]) == pytest.approx(trained.metrics["test_accuracy"])
        assert serving["int8_tolerance"] == "0.01" and "int8_roc_auc" in serving
        assert serving["int8_test_tolerance"] == "0.025000"  # 1.5 / 60 photos
        assert int(serving["int8_agreement_photos"]) == len(model_env.manifest)
        assert first.serving is not None and first.serving.agreement is not None
        assert set(first.serving.agreement.parts) == {"test", "negatives", "val", "train"}
        if serving["precision"] == "int8":
            assert float(serving["int8_agreement_lower_bound"]) >= 0.99, serving
            assert float(serving["int8_max_probability_diff"]) <= 0.1, serving
            gap = abs(float(serving["fp32_accuracy"]) - float(serving["int8_accuracy"]))
            assert gap <= 0.025 + 1e-9, serving
        assert first.serving is not None and first.serving.precision == serving["precision"]

        # 2. A weak challenger: below the floor, the champion alias stays where it was.
        client.set_registered_model_alias("dandelion", registry.CHALLENGER, weak_version)
        second = promotion.promote(model_env.settings, store=model_env.store)
        assert not second.promoted and "below the floor" in second.decision.reason
        assert (
            str(registry.get_alias_version(client, "dandelion", registry.CHAMPION).version) == good
        )
        tags = _tags(client, weak_version)
        assert tags["decision"] == "rejected"
        assert float(tags["challenger_accuracy"]) == pytest.approx(0.5)
        # logged without runtime artifacts: judged (and served) as Keras, and it says why
        weak_serving = _serving(client, weak_version)
        assert (weak_serving["runtime"], weak_serving["precision"]) == ("keras", "fp32")
        assert "has no runtime artifact" in weak_serving["reason"]
        # The champion was re-scored on the same test split.
        assert tags["champion_version"] == good
        assert float(tags["champion_accuracy"]) == pytest.approx(
            float(_tags(client, good)["challenger_accuracy"])
        )

        # 3. With no floor, the champion comparison decides (and rejects) on its own.
        third = promotion.promote(model_env.settings, store=model_env.store, floor=0.0)
        assert not third.promoted and "worse than the champion" in third.decision.reason
        assert (
            str(registry.get_alias_version(client, "dandelion", registry.CHAMPION).version) == good
        )

        # 4. A pinned benchmark version (half of the test split): both models are scored on
        #    it too and the figures logged; the gate still decides on the version's test split.
        bench, first_class_share = _half_test_version(model_env)
        pinned = model_env.settings.updated(**{"benchmark_dataset_version": bench})
        fourth = promotion.promote(pinned, store=model_env.store)
        assert not fourth.promoted and fourth.benchmark_version == bench
        tags = _tags(client, weak_version)
        assert tags["benchmark_dataset_version"] == bench
        # the weak model's ties go to the first class: its accuracy is that class's share
        assert float(tags["challenger_benchmark_accuracy"]) == pytest.approx(first_class_share)
        assert fourth.champion_benchmark is not None
        assert fourth.champion_benchmark.metrics["n"] == 30
        assert float(tags["champion_benchmark_accuracy"]) == pytest.approx(
            fourth.champion_benchmark.accuracy
        )
        metrics = client.get_run(tags["run_id"]).data.metrics
        assert metrics["benchmark_test_accuracy"] == pytest.approx(first_class_share)
        assert metrics["champion_benchmark_test_accuracy"] == pytest.approx(
            fourth.champion_benchmark.accuracy
        )

        # Versions themselves never changed: same sources, same runs.
        for v in (good, weak_version):
            assert client.get_model_version("dandelion", v).status == "READY"

    finally:  # leave the registry as training left it for the other model tests
        client.set_registered_model_alias("dandelion", registry.CHALLENGER, good)
        client.delete_registered_model_alias("dandelion", registry.CHAMPION)


def test_gate_serves_fp32_when_int8_does_not_agree_with_fp32(
    model_env: Any, lite0_trained: Any, mlflow_client: Any
) -> None:
    """INT8 is judged by its agreement with FP32 on the dataset version's photos (here at
    most ``LITE0_AGREEMENT_PHOTOS``, the test split first): a required agreement of 1 (no lower bound reaches it) or no probability difference at all
    forces FP32; lenient settings let INT8 be served, and the Predictor then loads the
    precision the gate chose. The agreement is measured once, with the saved scores."""
    from dandelion_lib.serving.predict import Predictor

    client = mlflow_client
    good = lite0_trained.model_version
    client.set_registered_model_alias("dandelion", registry.CHALLENGER, good)
    strict = model_env.settings.updated(
        **{"int8_min_agreement": 1.0, "int8_max_probability_diff": 0.0}
    )
    try:
        result = promotion.promote(strict, store=model_env.store, floor=0.0)
        serving = _serving(client, good)
        assert result.serving is not None and result.serving.int8 is not None
        agreement = result.serving.agreement
        assert agreement is not None
        # as many photos as training was allowed, the test split first
        assert agreement.photos == LITE0_AGREEMENT_PHOTOS < len(model_env.manifest)
        m = model_env.manifest
        test_photos = int(((m["split"] == "test") & (m["label"] != UNKNOWN)).sum())
        assert agreement.parts["test"][0] == test_photos  # the whole test split
        assert len(agreement.parts) >= 2
        assert serving["int8_agreement_photos"] == str(agreement.photos)
        assert float(serving["int8_agreement_lower_bound"]) < 1.0
        assert 0 < float(serving["int8_max_probability_diff"]) <= 1.0  # quantization moved it
        assert serving["precision"] == "fp32", serving
        assert "photos as FP32: lower bound" in serving["reason"] and "< 1" in serving["reason"]
        served = Predictor.load("models:/dandelion@champion", model_env.settings)
        assert (served.runtime, served.precision) == ("onnx", "fp32")
        assert served.serving["serving.precision"] == "fp32"

        exact = strict.updated(int8_min_agreement=0.0)
        promotion.promote(exact, store=model_env.store, floor=0.0)
        serving = _serving(client, good)
        assert serving["precision"] == "fp32" and "probabilities differ" in serving["reason"]

        lenient = model_env.settings.updated(
            **{"int8_min_agreement": 0.0, "int8_max_probability_diff": 1.0, "int8_tolerance": 1.0}
        )
        promotion.promote(lenient, store=model_env.store, floor=0.0)
        serving = _serving(client, good)
        assert serving["precision"] == "int8", serving
        assert serving["reason"].startswith(f"INT8 answers {agreement.identical} of ")
        run = client.get_run(_tags(client, good)["run_id"]).data
        assert run.metrics["int8_agreement_photos"] == agreement.photos
        assert run.params["int8_min_agreement"] == "0.0"
        served = Predictor.load("models:/dandelion@champion", model_env.settings)
        assert (served.runtime, served.precision) == ("onnx", "int8")
        assert served.runtime_note is None
    finally:
        client.set_registered_model_alias("dandelion", registry.CHALLENGER, good)
        client.delete_registered_model_alias("dandelion", registry.CHAMPION)
        for key in list(client.get_model_version("dandelion", good).tags):
            if key.startswith("serving."):
                client.delete_model_version_tag("dandelion", good, key)


def test_the_challenger_is_scored_once_by_training_and_promotion_reads_it(
    model_env: Any, trained: Any, mlflow_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training saves the scores of the version it registers (scores.json, computed on the
    runtime it built): promotion scores nothing, and the saved figures are those of the
    registered version scored from the registry."""
    from dandelion_lib.lifecycle import evaluate, scoring

    client = mlflow_client
    good = trained.model_version
    mv = client.get_model_version("dandelion", good)
    saved = scoring.saved_scores(client, mv)
    assert saved is not None and saved.version == good
    assert saved.dataset_version == model_env.version and saved.runtime == "onnx"
    assert saved.int8 is not None and saved.agreement is not None
    assert saved.fp32.model_version == good
    assert saved.fp32.metrics["accuracy"] == pytest.approx(trained.metrics["test_accuracy"])

    split = scoring.Split.of(model_env.store, model_env.version, model_env.settings)
    fresh = scoring.score_version(model_env.settings, f"models:/dandelion/{good}", split)
    np.testing.assert_allclose(fresh.fp32.probabilities, saved.fp32.probabilities, atol=1e-4)
    assert fresh.fp32.predictions["answer"].tolist() == saved.fp32.predictions["answer"].tolist()
    assert fresh.agreement is not None and fresh.agreement.identical == saved.agreement.identical

    def no_scoring(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("scored again")

    monkeypatch.setattr(evaluate, "evaluate_split", no_scoring)
    client.set_registered_model_alias("dandelion", registry.CHALLENGER, good)
    try:
        first = promotion.promote(model_env.settings, store=model_env.store)
        assert first.serving is not None
        assert saved.report(first.serving.precision).accuracy == first.decision.challenger_accuracy
        again = promotion.promote(model_env.settings, store=model_env.store)
        assert again.decision.challenger_accuracy == first.decision.challenger_accuracy
        assert again.serving == first.serving and again.promoted
        assert _tags(client, good)["run_id"] == again.run_id
    finally:
        client.set_registered_model_alias("dandelion", registry.CHALLENGER, good)
        client.delete_registered_model_alias("dandelion", registry.CHAMPION)
        for key in list(client.get_model_version("dandelion", good).tags):
            if key.startswith("serving."):
                client.delete_model_version_tag("dandelion", good, key)


def test_cli_promote_without_challenger_is_one_line(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from dandelion_lib import cli
    from dandelion_lib.core.config import get_settings

    monkeypatch.setenv("DANDELION_WORKDIR", str(tmp_path / "empty-work"))
    get_settings.cache_clear()
    try:
        code = cli.main(["promote"])
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("dandelion")] == [
        "dandelion promote: error: no version of model 'dandelion' has the alias 'challenger'; train one first"
    ]
