"""Validation metrics from per-prompt rewards (pure functions).

Input: one list of rewards per validation prompt, the k samples drawn for it (k = eval.k). A sample
is *correct* when its reward >= ``threshold`` (1.0 for the binary tasks; ``task.correct_threshold``
where a task defines another).

* ``mean_reward`` — mean over all samples; ``reward_std`` — their standard deviation.
* ``accuracy`` — fraction of correct samples over all samples (the same as ``avg@n`` when every prompt
  has n samples).
* ``avg@n`` — mean over prompts of the fraction of that prompt's n samples that are correct.
* ``pass@k`` — mean over prompts of the unbiased estimator of Chen et al. (2021), "Evaluating Large
  Language Models Trained on Code": with n samples of which c are correct,
  ``pass@k = 1 − C(n−c, k) / C(n, k)``, for every requested k <= n.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt: the probability that k of its n samples (c correct), drawn
    without replacement, contain at least one correct one. 1 − C(n−c, k)/C(n, k), computed as a
    stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: expected 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: expected 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, 8, ... up to n, and n itself."""
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def correct_counts(rewards: Sequence[Sequence[float]], threshold: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(n, c) per prompt: samples and correct samples."""
    n = np.array([len(r) for r in rewards], dtype=np.int64)
    c = np.array([int(np.sum(np.asarray(r, dtype=np.float64) >= threshold)) for r in rewards], dtype=np.int64)
    return n, c


def validation_metrics(rewards: Sequence[Sequence[float]], ks: Iterable[int] | None = None, threshold: float = 1.0) -> dict[str, float]:
    """Metrics over prompts × samples (see the module doc). ``ks`` defaults to ``default_ks(min n)``;
    a k larger than some prompt's sample count is an error. Keys: mean_reward, reward_std, accuracy,
    avg@<n> (when every prompt has the same n) and pass@<k>."""
    if len(rewards) == 0:
        raise ValueError("validation_metrics: no prompts")
    n, c = correct_counts(rewards, threshold)
    if np.any(n < 1):
        raise ValueError(f"validation_metrics: prompt {int(np.argmin(n))} has no samples")
    flat = np.concatenate([np.asarray(r, dtype=np.float64) for r in rewards])
    out = {"mean_reward": float(flat.mean()), "reward_std": float(flat.std()), "accuracy": float(c.sum() / n.sum())}
    n_min = int(n.min())
    if np.all(n == n_min):
        out[f"avg@{n_min}"] = float(np.mean(c / n))
    for k in ks if ks is not None else default_ks(n_min):
        if k > n_min:
            raise ValueError(f"validation_metrics: pass@{k} needs at least {k} samples per prompt, some prompt has {n_min}")
        out[f"pass@{k}"] = float(np.mean([pass_at_k(int(ni), int(ci), int(k)) for ni, ci in zip(n, c)]))
    return out
