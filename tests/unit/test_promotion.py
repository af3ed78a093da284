"""The promotion gate's rule (dandelion_lib.promotion); promotion on a real registry is
tested in tests/model/test_promote.py and tests/integration/test_train_registry.py."""

from __future__ import annotations

import pytest

from dandelion_lib import promotion
from dandelion_lib.promotion import promotion_gate


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "why"),
    [
        (0.95, None, True, "no champion"),
        (0.89, None, False, "below the floor"),
        (0.90, None, True, "floor"),  # the floor itself passes
        (0.89, 0.50, False, "below the floor"),  # the floor applies even vs a weak champion
        (0.95, 0.96, True, "within"),  # 1 point worse: within tolerance
        (0.94, 0.96, False, "worse than the champion"),
        (0.99, 0.96, True, "within"),
        (float("nan"), None, False, "below the floor"),
    ],
)
def test_promotion_gate(challenger: float, champion: float | None, promote: bool, why: str) -> None:
    d = promotion_gate(challenger, champion, floor=0.90, tolerance=0.01)
    assert d.promote is promote
    assert why in d.reason
    assert d.floor == 0.90 and d.champion_accuracy == champion


def test_promote_is_the_cli_command() -> None:
    from dandelion_lib.cli import COMMANDS

    assert COMMANDS["promote"][0] == promotion.__name__
