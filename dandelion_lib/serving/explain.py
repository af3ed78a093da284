"""Why this answer: where in the photo the model found the evidence for the class it explains.

The backbone's features are global poolings of its last convolutional feature maps (average or
maximum over the grid, one pooled value per channel), and the head maps them to
probabilities. The served runtime can also return those maps
(:mod:`dandelion_lib.serving.runtime`); :func:`Explainer.explain` turns them into a class
activation map, in numpy:

* the target is the explained class's logit against the mean of the other classes' logits
  (softmax's shift does not move it); its gradient with respect to the pooled features is
  computed in closed form through the head (standardisation, dropout as identity, dense
  layers with linear, ReLU or softmax activation);
* each map channel is weighted by the gradient of the features pooled from it (Grad-CAM);
  the weighted channels are summed over the grid, clipped at zero and divided by their
  maximum: a coarse grid (the maps' size, 11x11 on the default backbone at 352 px) in [0, 1].

For a linear head over average-pooled maps (the default recipe) this is exactly CAM: the
grid's mean over all cells, before clipping, is the class's logit margin up to a constant.
The grid covers the whole photo as the model saw it (squashed to a square), so it is drawn
stretched over the photo at the photo's aspect ratio; row 0 is the photo's top.

The class explained is the top class of the probabilities: the answer itself for a label, and
for ``uncertain`` or ``unknown`` the class the model leaned towards (the response says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dandelion_lib.core.errors import DandelionError

POOLS = ("avg", "max")
ARTIFACT = "explain.npz"
"""The head's weights for explanations, inside the model version's ``runtime/`` folder."""
GRID_DECIMALS = 3
"""Decimals of each grid value in an answer."""


class ExplanationUnavailableError(DandelionError):
    """The served model cannot explain its answers (one user-facing line)."""


@dataclass(frozen=True)
class HeadLayer:
    """One layer of the head, as numpy: ``standardize`` (``a`` mean, ``b`` standard
    deviation) or ``dense`` (``a`` kernel ``(in, out)``, ``b`` bias, ``activation``)."""

    kind: str
    a: npt.NDArray[np.float64]
    b: npt.NDArray[np.float64]
    activation: str = "linear"


@dataclass(frozen=True)
class Explanation:
    """A class activation map: ``grid`` ``(rows, cols)`` in [0, 1] for class ``explains``."""

    explains: str
    grid: npt.NDArray[np.float32]

    def to_dict(self) -> dict[str, Any]:
        rows, cols = self.grid.shape
        values = np.round(self.grid.astype(np.float64), GRID_DECIMALS).tolist()
        return {"class": self.explains, "shape": [rows, cols], "grid": values}


@dataclass(frozen=True)
class Explainer:
    """How features come from the maps, and the head: everything a CAM needs besides a photo.

    ``segments``: the features are the concatenation of ``pool(map i)`` for each
    ``(i, pool)`` in order (``pool``: ``avg`` or ``max``, one value per channel of map ``i``).
    """

    segments: tuple[tuple[int, str], ...]
    layers: tuple[HeadLayer, ...]

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {
            "segments": np.asarray([f"{i}:{pool}" for i, pool in self.segments]),
            "kinds": np.asarray([f"{ly.kind}:{ly.activation}" for ly in self.layers]),
        }
        for n, layer in enumerate(self.layers):
            arrays[f"a{n}"], arrays[f"b{n}"] = layer.a, layer.b
        with path.open("wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> Explainer:
        try:
            with np.load(path, allow_pickle=False) as data:
                segments = tuple(_segment(str(s)) for s in data["segments"])
                layers = []
                for n, kind in enumerate(str(k) for k in data["kinds"]):
                    name, _, activation = kind.partition(":")
                    a, b = np.asarray(data[f"a{n}"], np.float64), np.asarray(data[f"b{n}"])
                    layers.append(HeadLayer(name, a, b.astype(np.float64), activation))
        except (OSError, KeyError, ValueError) as exc:
            raise ExplanationUnavailableError(f"{path.name} cannot be read: {exc}") from exc
        return cls(segments, tuple(layers))

    def logits(self, features: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """The head's logits ``(N, classes)`` of pooled features ``(N, D)``, in float64 (the
        model's probabilities are their softmax, without float32's saturation at 1)."""
        x = np.asarray(features, dtype=np.float64)
        for layer in self.layers:
            x = (x - layer.a) / layer.b if layer.kind == "standardize" else x @ layer.a + layer.b
            x = np.maximum(x, 0.0) if layer.activation == "relu" else x
        return np.asarray(x)

    def gradient(self, features: npt.NDArray[Any], target: int) -> npt.NDArray[np.float64]:
        """d(logit[target] - mean of the other logits) / d(features), for one image."""
        x = np.asarray(features, dtype=np.float64)
        masks = []
        for layer in self.layers:  # forward: keep each ReLU's active units
            x = (x - layer.a) / layer.b if layer.kind == "standardize" else x @ layer.a + layer.b
            masks.append(x > 0 if layer.activation == "relu" else None)
            x = np.maximum(x, 0.0) if layer.activation == "relu" else x
        width = len(x)
        grad = np.full(width, -1.0 / max(width - 1, 1))
        grad[target] = 1.0
        for layer, mask in zip(reversed(self.layers), reversed(masks), strict=True):
            grad = grad * mask if mask is not None else grad
            grad = grad / layer.b if layer.kind == "standardize" else layer.a @ grad
        return np.asarray(grad)

    def explain(
        self,
        maps: list[npt.NDArray[Any]],
        features: npt.NDArray[Any],
        target: int,
        label: str,
    ) -> Explanation:
        """The grid for one image: ``maps`` its feature maps ``(rows, cols, channels)``,
        ``features`` its pooled features, ``target`` the index of class ``label``."""
        grad = self.gradient(features, target)
        weights = [np.zeros(m.shape[-1]) for m in maps]
        start = 0
        for i, _pool in self.segments:
            width = maps[i].shape[-1]
            weights[i] += grad[start : start + width]
            start += width
        if start != len(grad):
            raise ExplanationUnavailableError(
                f"the feature maps give {start} features, the head takes {len(grad)}"
            )
        rows, cols = maps[0].shape[:2]
        cam = np.zeros((rows, cols))
        for m, w in zip(maps, weights, strict=True):
            cam += _resize(np.asarray(m, dtype=np.float64) @ w, rows, cols)
        cam = np.maximum(cam, 0.0)
        top = float(cam.max())
        grid = cam / top if top > 0 and np.isfinite(top) else np.zeros_like(cam)
        return Explanation(label, grid.astype(np.float32))


def _segment(text: str) -> tuple[int, str]:
    index, _, pool = text.partition(":")
    if pool not in POOLS:
        raise ValueError(f"unknown pooling {pool!r}")
    return int(index), pool


def _resize(cam: npt.NDArray[np.float64], rows: int, cols: int) -> npt.NDArray[np.float64]:
    """Nearest-cell resize of a map of another grid size to ``rows x cols``."""
    if cam.shape == (rows, cols):
        return cam
    r = (np.arange(rows) * cam.shape[0] // rows).clip(0, cam.shape[0] - 1)
    c = (np.arange(cols) * cam.shape[1] // cols).clip(0, cam.shape[1] - 1)
    return cam[np.ix_(r, c)]


# --- from Keras (at export; no TensorFlow import here) -------------------------------------
_POOL_LAYERS = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max"}


def feature_maps(backbone: Any) -> tuple[list[Any], tuple[tuple[int, str], ...]] | None:
    """The last feature maps (Keras tensors) a backbone pools into its features, and the
    segments that say how; None when its output is not global poolings of 2-D maps (or a
    concatenation of them), e.g. a ``keras.applications`` model nested whole."""
    outputs = getattr(backbone, "outputs", None) or []
    if len(outputs) != 1:
        return None
    op = outputs[0]._keras_history[0]
    pooled = list(op.input) if type(op).__name__ == "Concatenate" else [outputs[0]]
    maps: list[Any] = []
    segments = []
    for tensor in pooled:
        pool = tensor._keras_history[0]
        kind = _POOL_LAYERS.get(type(pool).__name__)
        if kind is None or getattr(pool, "keepdims", False):
            return None
        source = pool.input
        if len(source.shape) != 4:
            return None
        index = next((i for i, m in enumerate(maps) if m is source), None)
        if index is None:
            maps.append(source)
            index = len(maps) - 1
        segments.append((index, kind))
    return maps, tuple(segments)


def head_layers(head: Any) -> tuple[HeadLayer, ...] | None:
    """The head's layers as numpy (:class:`HeadLayer`), or None for a head with another layer."""
    import keras

    out = []
    for layer in head.layers:
        name = type(layer).__name__
        if name in ("InputLayer", "Dropout"):
            continue
        if name == "Normalization":
            mean = keras.ops.convert_to_numpy(layer.mean).astype(np.float64).reshape(-1)
            var = keras.ops.convert_to_numpy(layer.variance).astype(np.float64).reshape(-1)
            std = np.maximum(np.sqrt(var), keras.backend.epsilon())
            out.append(HeadLayer("standardize", mean, std))
        elif name == "Dense":
            activation = getattr(layer.activation, "__name__", "")
            if activation not in ("linear", "relu", "softmax"):
                return None
            kernel, *bias = (np.asarray(w, np.float64) for w in layer.get_weights())
            b = bias[0] if bias else np.zeros(kernel.shape[1])
            out.append(HeadLayer("dense", kernel, b, activation))
        else:
            return None
    return tuple(out) if out else None


# --- faithfulness and pictures (numpy + PIL) -----------------------------------------------
DELETION_FRACTION = 0.2
"""Share of the grid's cells masked by the deletion test."""


def top_cells(grid: npt.NDArray[Any], fraction: float = DELETION_FRACTION) -> npt.NDArray[np.intp]:
    """Flat indices of the hottest ``fraction`` of the grid's cells (by area)."""
    k = max(1, round(fraction * grid.size))
    return np.argsort(-np.asarray(grid).ravel(), kind="stable")[:k]


DELETION_FILLS = ("black", "gray", "mean")
"""What the deletion test puts in the masked cells: ``black`` (0, the zero of the model's
input, which takes raw pixels in [0, 255]: the usual baseline of attribution methods),
``gray`` (127.5, the middle of the range: the zero of the backbone's normalised input) or
``mean`` (the photo's own mean colour)."""
DELETION_FILL = "black"
"""The fill the deletion target is judged with (docs/model.md shows every fill's figures)."""


def mask_cells(
    pixels: npt.NDArray[Any],
    shape: tuple[int, int],
    cells: npt.NDArray[np.intp],
    fill: str = DELETION_FILL,
) -> npt.NDArray[np.float32]:
    """A copy of one model input ``(size, size, 3)`` with the grid ``cells`` (flat indices of
    a ``shape`` grid over the whole input) filled as ``fill`` says (:data:`DELETION_FILLS`)."""
    out = np.array(pixels, dtype=np.float32)
    height, width = out.shape[:2]
    if fill == "mean":
        value = out.reshape(-1, 3).mean(axis=0)
    elif fill in DELETION_FILLS:
        value = np.full(3, 0.0 if fill == "black" else 127.5, np.float32)
    else:
        raise ValueError(f"fill must be one of {', '.join(DELETION_FILLS)}, not {fill!r}")
    rows, cols = shape
    for cell in np.asarray(cells).ravel():
        r, c = divmod(int(cell), cols)
        top, bottom = r * height // rows, (r + 1) * height // rows
        left, right = c * width // cols, (c + 1) * width // cols
        out[top:bottom, left:right] = value
    return out


def log_softmax(logits: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Log-probabilities ``(N, classes)`` of logits, computed without overflow."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return np.asarray(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))


def random_region(
    shape: tuple[int, int], cells: int, rng: np.random.Generator
) -> npt.NDArray[np.intp]:
    """Flat indices of ``cells`` cells forming one random near-square region of the grid
    (the first ``cells`` of a random window, row by row): a region like a hot spot."""
    rows, cols = shape
    height = min(rows, max(1, round(np.sqrt(cells))))
    width = min(cols, -(-cells // height))
    top = int(rng.integers(0, rows - height + 1))
    left = int(rng.integers(0, cols - width + 1))
    window = [(top + r) * cols + left + c for r in range(height) for c in range(width)]
    return np.asarray(window[:cells], dtype=np.intp)


@dataclass(frozen=True)
class Deletion:
    """One photo's deletion test: the explained class's log-probability before, with its
    hottest cells masked, and with a random region of as many cells masked (mean of the
    draws)."""

    before: float
    top: float
    random: float

    @property
    def holds(self) -> bool:
        """Masking the hot cells lowers the class's probability more than a random region
        (compared on log-probabilities: the same order, without saturating at 1)."""
        return self.before - self.top > self.before - self.random


def deletion_test(
    predict: Any,
    pixels: npt.NDArray[Any],
    explanation: Explanation,
    target: int,
    rng: np.random.Generator,
    draws: int = 3,
    fill: str = DELETION_FILL,
) -> Deletion:
    """Mask the hottest :data:`DELETION_FRACTION` of ``explanation``'s grid, and ``draws``
    random regions of as many cells (:func:`random_region`), in one photo, both filled as
    ``fill`` says (:func:`mask_cells`); ``predict`` maps a batch of model inputs to
    log-probabilities ``(N, classes)`` (or any score in the same order as the probabilities)
    and ``target`` is the explained class's index."""
    grid = explanation.grid
    shape = (int(grid.shape[0]), int(grid.shape[1]))
    hot = top_cells(grid)
    chosen = [hot] + [random_region(shape, len(hot), rng) for _ in range(draws)]
    batch = np.stack(
        [np.asarray(pixels, np.float32)] + [mask_cells(pixels, shape, c, fill) for c in chosen]
    )
    probs = np.asarray(predict(batch))[:, target]
    return Deletion(float(probs[0]), float(probs[1]), float(probs[2:].mean()))


def flower_mask(pixels: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Yellow or white pixels of an RGB image in [0, 255]: a dandelion's flower or seed head
    (a simple colour rule: hue 35-70 degrees, saturation >= 0.35, value >= 0.6; or
    saturation <= 0.15 and value >= 0.8)."""
    rgb = np.asarray(pixels, dtype=np.float64) / 255.0
    value = rgb.max(axis=-1)
    spread = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, spread / np.maximum(value, 1e-9), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(spread, 1e-9)
    hue = (
        np.where(
            value == r,
            ((g - b) / safe) % 6,
            np.where(value == g, (b - r) / safe + 2, 4 + (r - g) / safe),
        )
        * 60.0
    )
    yellow = (hue >= 35) & (hue <= 70) & (saturation >= 0.35) & (value >= 0.6)
    white = (saturation <= 0.15) & (value >= 0.8)
    return np.asarray(yellow | white)


def cell_shares(mask: npt.NDArray[np.bool_], shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    """The share of ``mask``'s pixels in each cell of a ``shape`` grid over the image."""
    rows, cols = shape
    height, width = mask.shape
    out = np.zeros(shape)
    for r in range(rows):
        for c in range(cols):
            block = mask[
                r * height // rows : (r + 1) * height // rows,
                c * width // cols : (c + 1) * width // cols,
            ]
            out[r, c] = block.mean() if block.size else 0.0
    return out


_COLOURS = np.array(  # a "jet" ramp: dark blue, blue, cyan, yellow, red
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]],
    dtype=np.float64,
)
"""Cold to hot; red, the hottest, stands out on yellow flowers and green lawns alike."""


def colour_map(grid: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """RGB colours ``(..., 3)`` of values in [0, 1] on :data:`_COLOURS`' ramp."""
    v = np.clip(np.asarray(grid, dtype=np.float64), 0.0, 1.0) * (len(_COLOURS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_COLOURS) - 2)
    t = (v - low)[..., None]
    return np.asarray(_COLOURS[low] * (1 - t) + _COLOURS[low + 1] * t, dtype=np.uint8)


def overlay(image: Any, grid: npt.NDArray[Any], opacity: float = 0.55) -> Any:
    """The photo (a PIL image, any size) with the grid drawn over it: stretched to the photo's
    own width and height (the grid spans the whole photo), smoothly upsampled, coloured by
    :func:`colour_map`, more opaque where hotter (up to ``opacity``). Returns an RGB image."""
    from PIL import Image

    photo = image.convert("RGB")
    values = Image.fromarray(np.asarray(np.clip(grid, 0, 1) * 255, dtype=np.uint8), mode="L")
    smooth = (
        np.asarray(values.resize(photo.size, Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    )
    colours = colour_map(smooth).astype(np.float64)
    alpha = (opacity * (0.25 + 0.75 * smooth))[..., None]
    mixed = np.asarray(photo, dtype=np.float64) * (1 - alpha) + colours * alpha
    return Image.fromarray(np.asarray(mixed.round(), dtype=np.uint8), mode="RGB")
