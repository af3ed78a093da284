"""The EfficientNet-Lite0 port: numpy reading of the .pth and the Keras network's numbers.

The reference fixture was computed once with two PyTorch implementations
(scripts/make_lite0_reference.py); torch is not needed here.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dandelion_lib.training import lite0 as lite0_lib
from dandelion_lib.training import model as model_lib

FIXTURES = Path(__file__).parent / "fixtures"


def pattern() -> np.ndarray:
    """Same formula as scripts/make_lite0_reference.py."""
    i, j, c = np.meshgrid(np.arange(224), np.arange(224), np.arange(3), indexing="ij")
    return ((i * 7 + j * 13 + c * 85 + (i * j) % 31) % 256).astype(np.float32)


def reference_inputs(ref: np.lib.npyio.NpzFile) -> np.ndarray:
    photos = [np.repeat(np.repeat(t, 14, axis=0), 14, axis=1) for t in ref["thumbnails"]]
    x = np.stack([p.astype(np.float32) for p in photos] + [pattern()])
    assert float(x[-1].sum()) == float(ref["pattern_sum"])
    return x


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return lite0_lib.read_torch_state_dict(lite0_lib.lite0_weights_file())


def test_packaged_weights_are_the_expected_file() -> None:
    path = lite0_lib.lite0_weights_file()
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == lite0_lib.LITE0_SHA256


def test_reads_legacy_pth_with_strides(state: dict[str, np.ndarray]) -> None:
    tensors = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(tensors) == 247  # 49 conv/bn/fc modules' weights
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(v.dtype == np.float32 for v in tensors.values())
    # Variances are never negative (a misread storage would give garbage here).
    assert all((state[k] >= 0).all() for k in state if k.endswith("running_var"))
    assert state["_bn0.num_batches_tracked"].dtype == np.int64


def test_reads_zip_format(tmp_path: Path) -> None:
    tiny = lite0_lib.read_torch_state_dict(FIXTURES / "tiny_state_dict.pth")
    np.testing.assert_array_equal(tiny["weight_t"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    np.testing.assert_array_equal(tiny["index"], np.array([3, -1, 7], dtype=np.int64))
    np.testing.assert_array_equal(tiny["half"], np.linspace(0, 1, 5).astype(np.float16))
    assert tiny["scalar"].shape == () and float(tiny["scalar"]) == 2.5


def test_refuses_code_in_pickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    with bad.open("wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"w": Evil()}, f, protocol=2)
    with pytest.raises(lite0_lib.WeightsFileError, match="unsupported object"):
        lite0_lib.read_torch_state_dict(bad)
    assert not marker.exists()


def test_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    data = lite0_lib.lite0_weights_file().read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(lite0_lib.WeightsFileError, match="truncated"):
        lite0_lib.read_torch_state_dict(cut)
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(lite0_lib.WeightsFileError):
        lite0_lib.read_torch_state_dict(text)
    with pytest.raises(lite0_lib.WeightsFileError, match="not found"):
        lite0_lib.read_torch_state_dict(tmp_path / "missing.pth")


def test_keras_lite0_matches_pytorch_reference(lite0: object) -> None:
    ref = np.load(FIXTURES / "lite0_reference.npz")
    features = np.asarray(lite0(reference_inputs(ref), training=False))  # type: ignore[operator]
    assert features.shape == (3, 1280)
    np.testing.assert_allclose(features, ref["features"], rtol=1e-3, atol=2e-4)
    # Not trivially satisfied: the inputs give clearly different features.
    assert np.abs(ref["features"][0] - ref["features"][1]).max() > 0.5


def test_lite0_architecture(lite0: object) -> None:
    from keras import layers

    model = lite0
    assert model.count_params() == 3_413_024  # type: ignore[attr-defined]
    kinds = {type(ly) for ly in model.layers}  # type: ignore[attr-defined]
    assert layers.DepthwiseConv2D in kinds and layers.ReLU in kinds
    relus = [ly for ly in model.layers if isinstance(ly, layers.ReLU)]  # type: ignore[attr-defined]
    assert relus and all(float(ly.max_value) == 6.0 for ly in relus)
    # Built-in Keras layers only: no squeeze-excite multiply, no Lambda.
    assert all(type(ly).__module__.startswith("keras.") for ly in model.layers)  # type: ignore[attr-defined]
    assert not any(isinstance(ly, layers.Multiply | layers.Lambda) for ly in model.layers)  # type: ignore[attr-defined]


def test_lite0_backbone_pools_the_head_and_the_last_block(lite0: object) -> None:
    """The backbone's 1600-d features: the port's pooled head, then the last block pooled."""
    import keras

    ref = np.load(FIXTURES / "lite0_reference.npz")
    x = reference_inputs(ref)
    backbone = model_lib.build_backbone("efficientnet_lite0", image_size=x.shape[1])
    assert backbone.feature_dim == 1600
    features = np.asarray(backbone.model(x, training=False))
    np.testing.assert_allclose(features[:, :1280], ref["features"], rtol=1e-3, atol=2e-4)
    last = keras.Model(lite0.input, lite0.get_layer(lite0_lib.LITE0_LAST_BLOCK).output)  # type: ignore[attr-defined]
    pooled = np.asarray(last(x, training=False)).mean(axis=(1, 2))
    np.testing.assert_allclose(features[:, 1280:], pooled, rtol=1e-4, atol=1e-4)
    assert np.abs(pooled[0] - pooled[1]).max() > 0.5


def test_full_model_saves_and_loads_without_custom_objects(tmp_path: Path, lite0: object) -> None:
    import keras

    backbone = model_lib.Backbone("efficientnet_lite0", lite0, True)
    head = model_lib.build_head(backbone.feature_dim, 2, seed=1)
    full = model_lib.assemble(backbone, head)
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    before = np.asarray(full(x, training=False))
    path = tmp_path / "m.keras"
    full.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)  # no custom_objects
    after = np.asarray(loaded(x, training=False))
    np.testing.assert_allclose(after, before, atol=1e-5)
    np.testing.assert_allclose(after.sum(axis=1), 1.0, atol=1e-5)


def test_fine_tuning_unfreezes_only_top_blocks(lite0: object) -> None:
    from keras import layers

    backbone = model_lib.Backbone("efficientnet_lite0", lite0, True)
    try:
        model_lib.set_trainable_top(backbone, 2)
        flat = model_lib._flatten_layers(lite0)
        trainable = {ly.name for ly in flat if ly.trainable and ly.weights}
        assert "head_conv" in trainable and "block15_dw_conv" in trainable
        assert "block14_project_conv" in trainable and "block13_project_conv" not in trainable
        assert not any(isinstance(ly, layers.BatchNormalization) and ly.trainable for ly in flat)
    finally:
        lite0.trainable = False  # type: ignore[attr-defined]


def test_unknown_backbone_and_weights_are_user_errors() -> None:
    from dandelion_lib.core.errors import DandelionError

    with pytest.raises(DandelionError, match="unknown backbone 'resnet9'"):
        model_lib.build_backbone("resnet9")
    with pytest.raises(DandelionError, match="unknown weights"):
        model_lib.build_backbone("mobilenet_v2", weights="coco")


def test_offline_keras_applications_name_the_offline_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline is made real: an empty Keras cache (Keras reads KERAS_HOME only at import, so
    its home is pointed at an empty folder) and a proxy that refuses connections."""
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "keras"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen builds its global opener, proxies included, once: drop the one built here.
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(lite0_lib.BackboneUnavailableError) as info:
        model_lib.build_backbone("mobilenet_v2", weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "mobilenet_v2" in message and "'efficientnet_lite0'" in message


def test_small_cnn_builds_offline_from_scratch() -> None:
    backbone = model_lib.build_backbone("small_cnn", image_size=224)
    assert not backbone.pretrained and backbone.feature_dim == 128
    out = backbone.model(np.zeros((1, 224, 224, 3), np.float32))
    assert tuple(out.shape) == (1, 128)
