"""The promotion gate's rule (dandelion_lib.lifecycle.promotion); promotion on a real registry is
tested in tests/model/test_promote.py and tests/integration/test_train_registry.py."""

from __future__ import annotations

import pytest

from dandelion_lib.lifecycle import promotion
from dandelion_lib.lifecycle.promotion import promotion_gate


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


@pytest.mark.parametrize(
    ("challenger_ood", "champion_ood", "promote", "why"),
    [
        (0.90, None, True, "no champion"),  # nothing to compare with
        (0.90, 0.95, True, "out-of-domain rejection 0.9000 within 0.0500"),
        (0.89, 0.95, False, "answered 'unknown' 0.8900 is below the champion's 0.9500"),
        (None, 0.95, False, "answered 'unknown' 0.0000"),  # a challenger without a detector
        (0.99, 0.50, True, "within"),
    ],
)
def test_gate_refuses_an_out_of_domain_regression(
    challenger_ood: float | None, champion_ood: float | None, promote: bool, why: str
) -> None:
    d = promotion_gate(
        0.97,
        None if why == "no champion" else 0.97,
        floor=0.90,
        tolerance=0.01,
        challenger_ood_unknown=challenger_ood,
        champion_ood_unknown=champion_ood,
        ood_tolerance=0.05,
    )
    assert d.promote is promote, d.reason
    assert why in d.reason
    assert d.champion_ood_unknown == champion_ood


def test_accuracy_still_decides_first() -> None:
    d = promotion_gate(
        0.80, 0.97, floor=0.90, tolerance=0.01, challenger_ood_unknown=1.0, champion_ood_unknown=0.5
    )
    assert not d.promote and "below the floor" in d.reason


def test_promote_is_the_cli_command() -> None:
    from dandelion_lib.cli import COMMANDS

    assert COMMANDS["promote"][0] == promotion.__name__
