"""Behavioural tests of the trained model on real test-split images (Made-With-ML style):
invariance to horizontal flips, small rotations and +/-10 % brightness, and confident,
correct answers on clear examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageOps

from dandelion_lib.core.features import to_model_input
from dandelion_lib.core.images import decode_image
from dandelion_lib.serving.predict import Predictor


@pytest.fixture(scope="module")
def predictor(lite0_predictor: Predictor) -> Predictor:
    """The real backbone's tiny model (EfficientNet-Lite0): these check the real model's
    behaviour, not the test stand-in's."""
    return lite0_predictor


@pytest.fixture(scope="module")
def images(model_env: Any, test_split: pd.DataFrame) -> list[Image.Image]:
    return [decode_image(model_env.store.get_bytes(k)) for k in test_split["key"]]


def _probs(predictor: Predictor, imgs: list[Image.Image]) -> np.ndarray:
    batch = np.stack([to_model_input(im, predictor.spec) for im in imgs])
    preds = predictor.predict_arrays(batch)
    return np.asarray([[p.probabilities[lab] for lab in predictor.labels] for p in preds])


PERTURBATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "flip": ImageOps.mirror,
    "rotate+5": lambda im: im.rotate(5, resample=Image.Resampling.BILINEAR, expand=False),
    "rotate-5": lambda im: im.rotate(-5, resample=Image.Resampling.BILINEAR, expand=False),
    "brightness+10%": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "brightness-10%": lambda im: ImageEnhance.Brightness(im).enhance(0.9),
}


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_invariance(name: str, predictor: Predictor, images: list[Image.Image]) -> None:
    base = _probs(predictor, images)
    moved = _probs(predictor, [PERTURBATIONS[name](im) for im in images])
    same_label = (base.argmax(1) == moved.argmax(1)).mean()
    shift = np.abs(base - moved)[:, 0]
    assert same_label >= 0.95, f"{name}: only {same_label:.0%} of labels unchanged"
    assert shift.mean() <= 0.05, f"{name}: mean probability shift {shift.mean():.3f}"


def test_confident_on_clear_examples(
    predictor: Predictor, images: list[Image.Image], test_split: pd.DataFrame
) -> None:
    """Clear examples, chosen by image statistics (not by the model): dandelion photos with
    plenty of yellow flowers among green leaves (a yellow sky over grey seed heads is not
    clear), grass photos that are mostly green with no yellow."""
    clear_dandelion = (
        (test_split["label"] == "dandelion")
        & (test_split["yellow_fraction"] > 0.15)
        & (test_split["green_fraction"] > 0.1)
    )
    clear_grass = (
        (test_split["label"] == "grass")
        & (test_split["green_fraction"] > 0.5)
        & (test_split["yellow_fraction"] < 0.02)
    )
    clear = (clear_dandelion | clear_grass).to_numpy()
    assert clear_dandelion.sum() >= 3 and clear_grass.sum() >= 3
    probs = _probs(predictor, [im for im, c in zip(images, clear, strict=True) if c])
    truth = [predictor.labels.index(lab) for lab in test_split.loc[clear, "label"]]
    on_truth = probs[np.arange(len(truth)), truth]
    assert (on_truth > 0.5).all(), on_truth
