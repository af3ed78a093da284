"""The class activation map (dandelion_lib.serving.explain) on hand-made maps and heads: the
gradient through the head, CAM's exactness for a linear head over average-pooled maps, the
grid's range, and the artifact's round trip. The served runtime's maps are tested in
tests/model/test_explain_model.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dandelion_lib.serving.explain import (
    DELETION_FILL,
    Explainer,
    Explanation,
    ExplanationUnavailableError,
    HeadLayer,
    cell_shares,
    colour_map,
    deletion_test,
    flower_mask,
    mask_cells,
    overlay,
    top_cells,
)

RNG = np.random.default_rng(3)


def linear_head(dim: int, classes: int = 2) -> tuple[HeadLayer, ...]:
    mean, std = RNG.normal(size=dim), RNG.uniform(0.5, 2.0, size=dim)
    kernel, bias = RNG.normal(size=(dim, classes)), RNG.normal(size=classes)
    return (HeadLayer("standardize", mean, std), HeadLayer("dense", kernel, bias, "softmax"))


def logits(layers: tuple[HeadLayer, ...], x: np.ndarray) -> np.ndarray:
    for layer in layers:
        x = (x - layer.a) / layer.b if layer.kind == "standardize" else x @ layer.a + layer.b
        x = np.maximum(x, 0.0) if layer.activation == "relu" else x
    return x


def margin(layers: tuple[HeadLayer, ...], x: np.ndarray, target: int) -> float:
    z = logits(layers, x)
    return float(z[target] - np.delete(z, target).mean())


@pytest.mark.parametrize("hidden", [False, True])
def test_the_gradient_is_the_class_margins_gradient(hidden: bool) -> None:
    layers = linear_head(6, classes=3)
    if hidden:  # a small hidden ReLU layer: Grad-CAM's closed form through it
        layers = (
            layers[0],
            HeadLayer("dense", RNG.normal(size=(6, 5)), RNG.normal(size=5), "relu"),
            HeadLayer("dense", RNG.normal(size=(5, 3)), RNG.normal(size=3), "softmax"),
        )
    explainer = Explainer(((0, "avg"),), layers)
    x = RNG.normal(size=6)
    eps = 1e-6
    for target in range(3):
        numeric = [
            (margin(layers, x + eps * e, target) - margin(layers, x - eps * e, target)) / (2 * eps)
            for e in np.eye(6)
        ]
        assert np.allclose(explainer.gradient(x, target), numeric, atol=1e-5)


def test_a_linear_head_over_average_pooled_maps_is_exact_cam() -> None:
    # two maps of one grid, average-pooled: the margin is the mean of the unclipped map
    maps = [RNG.uniform(0, 3, size=(4, 5, 3)), RNG.normal(size=(4, 5, 2))]
    layers = linear_head(5)
    explainer = Explainer(((0, "avg"), (1, "avg")), layers)
    features = np.concatenate([m.mean(axis=(0, 1)) for m in maps])
    grad = explainer.gradient(features, 1)
    cam = maps[0] @ grad[:3] + maps[1] @ grad[3:]
    base = margin(layers, np.zeros(5), 1)
    assert np.isclose(cam.mean() + base, margin(layers, features, 1))
    got = explainer.explain(maps, features, 1, "grass")
    assert got.explains == "grass" and got.grid.shape == (4, 5)
    expected = np.maximum(cam, 0) / np.maximum(cam, 0).max()
    assert np.allclose(got.grid, expected, atol=1e-6)
    assert got.grid.min() >= 0.0 and got.grid.max() == pytest.approx(1.0)


def test_the_hot_cell_is_where_the_evidence_is() -> None:
    # one channel that raises dandelion's logit, one that lowers it; a pool of each kind
    head = (HeadLayer("dense", np.array([[2.0, -2.0], [-1.0, 1.0]]), np.zeros(2), "softmax"),)
    grid = np.zeros((3, 3, 1))
    grid[0, 2, 0] = 5.0  # evidence for class 0 in the top-right cell
    explainer = Explainer(((0, "avg"), (0, "max")), head)
    features = np.array([grid.mean(), grid.max()])
    got = explainer.explain([grid], features, 0, "dandelion")
    assert np.argwhere(got.grid == 1.0).tolist() == [[0, 2]]
    # the other class finds no evidence anywhere: an all-zero grid, not NaN
    other = explainer.explain([grid], features, 1, "grass").grid
    assert np.isfinite(other).all()
    assert other.max() == 0.0


def test_maps_of_another_grid_are_resized_and_widths_must_match() -> None:
    head = linear_head(3)
    explainer = Explainer(((0, "avg"), (1, "max")), head)
    maps = [RNG.uniform(size=(4, 4, 2)), RNG.uniform(size=(2, 2, 1))]
    features = np.array([*maps[0].mean(axis=(0, 1)), maps[1].max()])
    assert explainer.explain(maps, features, 0, "dandelion").grid.shape == (4, 4)
    with pytest.raises(ExplanationUnavailableError, match="give 2 features, the head takes 3"):
        Explainer(((0, "avg"),), head).explain(maps[:1], features, 0, "dandelion")


def test_the_artifact_round_trips_and_a_bad_one_says_so(tmp_path: Path) -> None:
    explainer = Explainer(((0, "avg"), (0, "max")), linear_head(4))
    path = tmp_path / "explain.npz"
    explainer.save(path)
    back = Explainer.load(path)
    assert back.segments == explainer.segments
    x = RNG.normal(size=4)
    assert np.allclose(back.gradient(x, 0), explainer.gradient(x, 0))
    path.write_bytes(b"not an archive")
    with pytest.raises(ExplanationUnavailableError, match=r"explain\.npz cannot be read"):
        Explainer.load(path)


def test_an_explanation_answers_a_small_grid() -> None:
    head = linear_head(2)
    maps = [RNG.uniform(size=(2, 3, 2))]
    got = Explainer(((0, "avg"),), head).explain(maps, maps[0].mean(axis=(0, 1)), 0, "dandelion")
    body = got.to_dict()
    assert body["class"] == "dandelion" and body["shape"] == [2, 3]
    assert len(body["grid"]) == 2 and all(len(row) == 3 for row in body["grid"])
    assert all(round(v, 3) == v for row in body["grid"] for v in row)


@pytest.mark.parametrize(
    ("fill", "expected"),
    [("black", lambda p: 0.0), ("gray", lambda p: 127.5), ("mean", lambda p: p.mean(axis=(0, 1)))],
)
def test_masking_fills_the_chosen_cells_only(fill: str, expected: Any) -> None:
    pixels = RNG.uniform(0, 255, size=(8, 12, 3)).astype(np.float32)
    grid = np.zeros((2, 3))
    grid[1, 2], grid[0, 0] = 1.0, 0.5
    assert top_cells(grid, fraction=0.34).tolist() == [5, 0]
    out = mask_cells(pixels, (2, 3), np.array([5]), fill)
    assert np.allclose(out[4:, 8:], expected(pixels))
    assert np.array_equal(out[:4], pixels[:4]) and np.array_equal(out[4:, :8], pixels[4:, :8])


def test_the_deletion_test_judges_with_black_and_refuses_an_unknown_fill() -> None:
    pixels = RNG.uniform(0, 255, size=(8, 12, 3)).astype(np.float32)
    assert DELETION_FILL == "black"
    assert np.array_equal(
        mask_cells(pixels, (2, 3), np.array([0])),
        mask_cells(pixels, (2, 3), np.array([0]), "black"),
    )
    with pytest.raises(ValueError, match="fill must be one of black, gray, mean"):
        mask_cells(pixels, (2, 3), np.array([0]), "white")


def test_the_deletion_test_compares_the_hot_cells_with_random_ones() -> None:
    # a "model" whose class-0 probability is the share of bright-red pixels
    def predict(batch: np.ndarray) -> np.ndarray:
        red = ((batch[..., 0] > 200) & (batch[..., 1] < 50)).mean(axis=(1, 2))
        return np.stack([red, 1 - red], axis=1)

    pixels = np.zeros((20, 20, 3), np.float32)
    pixels[:4, :4] = (255, 0, 0)  # red only in the top-left cell of a 5 x 5 grid
    grid = np.zeros((5, 5), np.float32)
    grid[0, 0] = 1.0
    hot = Explanation("dandelion", grid)
    got = deletion_test(predict, pixels, hot, 0, np.random.default_rng(0))
    assert got.before == pytest.approx(0.04) and got.top == 0.0 and got.holds
    away = np.add.outer(np.arange(5), np.arange(5)) / 8.0  # hottest far from the red cell
    wrong = Explanation("dandelion", away.astype(np.float32))
    assert not deletion_test(predict, pixels, wrong, 0, np.random.default_rng(0)).holds


def test_the_flower_colour_rule() -> None:
    colours = np.array([[[250, 220, 30], [245, 245, 240], [60, 140, 40], [120, 110, 20]]], float)
    # dandelion yellow, seed-head white, lawn green, dark olive
    assert flower_mask(colours).tolist() == [[True, True, False, False]]
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    assert cell_shares(mask, (2, 2)).tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_the_overlay_spans_the_photo_at_its_own_aspect_ratio() -> None:
    from PIL import Image

    photo = Image.new("RGB", (300, 120), (128, 128, 128))
    grid = np.zeros((11, 11), np.float32)
    grid[:, 8:] = 1.0  # hot on the right
    out = overlay(photo, grid)
    assert out.size == photo.size and out.mode == "RGB"
    array = np.asarray(out, dtype=float)
    right, left = array[:, -20:].mean(axis=(0, 1)), array[:, :20].mean(axis=(0, 1))
    assert right[0] > 180 and right[0] > right[2] + 80  # red where hot
    assert left[2] > left[0]  # a light blue tint where cold
    assert np.abs(left - 128).max() < 60  # the photo still shows through
    assert colour_map(np.array([0.0, 1.0])).tolist() == [[0, 0, 128], [255, 0, 0]]
