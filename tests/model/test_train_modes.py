"""The other training modes, end to end on a tiny subset: fine-tuning the top blocks of the
ported backbone, and the from-scratch CNN. Slow: both backpropagate through convolutions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dandelion_lib.lifecycle.train import train
from dandelion_lib.training.config import TrainConfig

pytestmark = pytest.mark.slow


def test_fine_tuning_phase_updates_top_blocks_only(model_env: Any) -> None:
    config = TrainConfig(
        max_images_per_class=12, augment_copies=0, epochs=30, fine_tune_epochs=2, register=False
    )
    result = train(config, model_env.settings, store=model_env.store, progress=False)
    backbone = result.model.get_layer("efficientnet_lite0")
    from dandelion_lib.training.lite0 import build_efficientnet_lite0

    fresh = build_efficientnet_lite0(weights=True)
    changed = {
        ly.name
        for ly in backbone.layers
        if ly.weights
        and any(
            not np.array_equal(a, b)
            for a, b in zip(ly.get_weights(), fresh.get_layer(ly.name).get_weights(), strict=True)
        )
    }
    assert "head_conv" in changed and "block15_project_conv" in changed
    assert "stem_conv" not in changed and "block0_dw_conv" not in changed
    assert not any(name.endswith("_bn") for name in changed)  # batch norm stays frozen
    assert max(result.history["phase"]) == 1.0  # the fine-tuning epochs were logged
    assert 0.0 <= result.metrics["test_accuracy"] <= 1.0


def test_small_cnn_trains_from_scratch(model_env: Any) -> None:
    config = TrainConfig(backbone="small_cnn", max_images_per_class=12, epochs=2, register=False)
    result = train(config, model_env.settings, store=model_env.store, progress=False)
    assert len(result.history["loss"]) == 2
    assert result.model.get_layer("small_cnn") is not None
    assert result.model_uri.startswith("models:/")
