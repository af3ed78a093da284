"""Behavioural tests of the trained model on real test-split images (Made-With-ML style):
invariance to horizontal flips, small rotations and +/-10 % brightness, the same answer
whatever file a user sends the photo as (phone-sized JPEG, EXIF orientation, PNG with alpha,
WebP, CMYK, heavy compression), and confident, correct answers on clear examples."""

from __future__ import annotations

import io
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


@pytest.fixture(scope="module")
def base_probs(predictor: Predictor, images: list[Image.Image]) -> np.ndarray:
    """The unperturbed photos' probabilities, once for every perturbation."""
    return _probs(predictor, images)


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_invariance(
    name: str, predictor: Predictor, images: list[Image.Image], base_probs: np.ndarray
) -> None:
    base = base_probs
    moved = _probs(predictor, [PERTURBATIONS[name](im) for im in images])
    same_label = (base.argmax(1) == moved.argmax(1)).mean()
    shift = np.abs(base - moved)[:, 0]
    assert same_label >= 0.95, f"{name}: only {same_label:.0%} of labels unchanged"
    assert shift.mean() <= 0.05, f"{name}: mean probability shift {shift.mean():.3f}"


def _encoded(img: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def _sideways_with_exif(img: Image.Image) -> bytes:
    """Stored rotated, as phones do, with the EXIF orientation (6) that turns it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = img.transpose(Image.Transpose.ROTATE_90)
    return _encoded(rotated, "JPEG", quality=92, exif=exif.tobytes())


ENCODINGS: dict[str, Callable[[Image.Image], bytes]] = {
    "phone-sized jpeg": lambda im: _encoded(
        im.resize((4032, round(4032 * im.height / im.width)), Image.Resampling.BICUBIC),
        "JPEG",
        quality=92,
    ),
    "exif orientation": _sideways_with_exif,
    "png with alpha": lambda im: _encoded(im.convert("RGBA"), "PNG"),
    "webp": lambda im: _encoded(im, "WEBP", quality=90),
    "cmyk jpeg": lambda im: _encoded(im.convert("CMYK"), "JPEG", quality=92),
    "jpeg quality 40": lambda im: _encoded(im, "JPEG", quality=40),
}


@pytest.fixture(scope="module")
def base_predictions(predictor: Predictor, images: list[Image.Image]) -> list[Any]:
    """The photos sent as lossless PNGs, once for every other file type."""
    return predictor.predict_bytes([_encoded(im, "PNG") for im in images])


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_the_same_answer_whatever_file_the_photo_comes_in(
    name: str, predictor: Predictor, images: list[Image.Image], base_predictions: list[Any]
) -> None:
    """Through the users' path (bytes -> decode at the model's size -> answer): the file a
    photo is sent as must not change its answer."""
    base = base_predictions
    sent = predictor.predict_bytes([ENCODINGS[name](im) for im in images])
    same = np.mean(
        [
            predictor.decide(a).label == predictor.decide(b).label
            for a, b in zip(base, sent, strict=True)
        ]
    )
    shift = np.mean([abs(a.confidence - b.confidence) for a, b in zip(base, sent, strict=True)])
    assert same >= 0.95, f"{name}: only {same:.0%} of answers unchanged"
    assert shift <= 0.02, f"{name}: mean confidence shift {shift:.3f}"


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
