"""Model-test fixtures: the ported backbone, built once per session."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def lite0() -> Any:
    """The pure-Keras EfficientNet-Lite0 with the packaged ImageNet weights."""
    from dandelion_lib.model import build_efficientnet_lite0

    model = build_efficientnet_lite0(weights=True)
    model.trainable = False
    return model
