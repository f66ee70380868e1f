"""Validation metrics against hand-computed values."""

from __future__ import annotations

from math import comb

import pytest

from essa_hpc.metrics import correct_counts, default_ks, pass_at_k, validation_metrics


def test_pass_at_k_hand_values() -> None:
    # n=5, c=2: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@3 = 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 2, 4) == 1.0  # n - c < k: any 4 of 5 contain a correct one
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    for n, c, k in [(10, 3, 4), (20, 1, 7), (16, 9, 2)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_validation_metrics_hand_values() -> None:
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.5]]
    m = validation_metrics(rewards)
    assert set(m) == {"mean_reward", "reward_std", "accuracy", "avg@4", "pass@1", "pass@2", "pass@4"}
    assert m["mean_reward"] == pytest.approx(5.5 / 12)
    assert m["accuracy"] == pytest.approx(5 / 12) and m["avg@4"] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)
    assert m["pass@1"] == pytest.approx(5 / 12)
    # pass@2: prompt 1 (n=4,c=2): 1 - C(2,2)/C(4,2) = 5/6; prompt 2: 0; prompt 3 (c=3): 1 - 0 = 1
    assert m["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    # a lower threshold (e.g. a fractional IFEval reward) counts 0.5 as correct
    assert validation_metrics(rewards, ks=[1], threshold=0.5)["accuracy"] == pytest.approx(6 / 12)


def test_single_sample_and_ragged() -> None:
    m = validation_metrics([[1.0], [0.0], [1.0], [0.25]])
    assert m["accuracy"] == 0.5 and m["avg@1"] == 0.5 and m["pass@1"] == 0.5 and m["mean_reward"] == pytest.approx(2.25 / 4)
    ragged = validation_metrics([[1.0, 0.0, 0.0], [1.0, 1.0]], ks=[1, 2])
    assert "avg@2" not in ragged and ragged["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert ragged["pass@2"] == pytest.approx(((1 - comb(2, 2) / comb(3, 2)) + 1) / 2)
    with pytest.raises(ValueError, match="pass@3"):
        validation_metrics([[1.0, 0.0, 0.0], [1.0, 1.0]], ks=[3])
    with pytest.raises(ValueError):
        validation_metrics([])


def test_helpers() -> None:
    assert default_ks(1) == [1] and default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6]
    n, c = correct_counts([[1, 0], [0.99, 1.0, 1.0]])
    assert n.tolist() == [2, 3] and c.tolist() == [1, 2]
