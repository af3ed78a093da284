"""No training/serving skew: the training input pipeline and the Predictor produce
identical model inputs from the same image bytes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from dandelion_lib.core.features import FeatureSpec
from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data.dataset import load_examples
from dandelion_lib.serving.predict import Predictor
from dandelion_lib.training.extraction import make_dataset


def _training_inputs(store: Any, rows: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    """What the training pipeline feeds the model (without augmentation)."""
    ds = make_dataset(load_examples(store, rows, spec), batch_size=4)
    return np.concatenate([batch.numpy() for batch in ds])


def test_training_and_serving_inputs_are_identical(
    model_env: Any, test_split: pd.DataFrame, predictor: Predictor
) -> None:
    rows = test_split.head(12)
    train_inputs = _training_inputs(model_env.store, rows, predictor.spec)
    served = np.stack([predictor.decode(model_env.store.get_bytes(k))[0] for k in rows["key"]])
    assert train_inputs.dtype == served.dtype == np.float32
    size = predictor.spec.image_size
    assert train_inputs.shape == served.shape == (12, size, size, 3)
    np.testing.assert_array_equal(train_inputs, served)
    assert served.max() > 200 and served.min() < 50  # real pixels in [0, 255], unnormalised


def test_identical_for_awkward_encodings(tmp_path: Path, greenr_dir: Path) -> None:
    """PNG with alpha, grayscale, EXIF-rotated JPEG, palette GIF: same bytes, same input."""
    photo = Image.open(greenr_dir / "dandelion" / "00000001.jpg").convert("RGB")
    blobs: dict[str, bytes] = {}

    def save(name: str, img: Image.Image, fmt: str, **kw: Any) -> None:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        blobs[name] = buf.getvalue()

    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    save("alpha.png", rgba, "PNG")
    save("gray.jpg", photo.convert("L"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("rotated.jpg", photo, "JPEG", exif=exif)
    save("palette.gif", photo.convert("P"), "GIF")

    store = LocalStore(tmp_path / "store")
    for name, data in blobs.items():
        store.put_bytes(f"raw/x/{name}", data)
    rows = pd.DataFrame({"key": [f"raw/x/{n}" for n in blobs]})
    spec = FeatureSpec()
    train_inputs = _training_inputs(store, rows, spec)
    serving = Predictor(model=None, spec=spec)
    served = np.stack([serving.decode(data)[0] for data in blobs.values()])
    np.testing.assert_array_equal(train_inputs, served)
    # The EXIF rotation is applied (portrait content differs from the unrotated photo).
    plain = serving.decode(blobs["gray.jpg"])[0]
    assert not np.array_equal(served[2], plain)


def test_logged_feature_spec_is_the_training_spec(predictor: Predictor) -> None:
    assert predictor.spec == FeatureSpec()
    assert predictor.spec.normalization == "inside the model"
