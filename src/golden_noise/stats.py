"""Paired statistics for comparing a method's per-prompt scores with a baseline's on the same prompts."""
from __future__ import annotations

import math

import numpy as np


def describe(scores) -> dict:
    """Mean, sample standard deviation (ddof=1; 0 for one score) and count."""
    x = np.asarray(scores, dtype=np.float64)
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0}


def win_rate(diffs) -> float:
    """Share of prompts where the method beats the baseline; a tie counts as half a win."""
    d = np.asarray(diffs, dtype=np.float64)
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


def bootstrap_ci(diffs, samples: int = 10000, seed: int = 0, level: float = 0.95,
                 chunk: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `diffs` (prompts resampled with replacement; seeded)."""
    d = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))  # (chunk, n)
        means[start:stop] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def wilcoxon_p(diffs) -> float:
    """Two-sided Wilcoxon signed-rank p-value (zero differences dropped; 1.0 when all are zero)."""
    from scipy.stats import wilcoxon

    d = np.asarray(diffs, dtype=np.float64)
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def ttest_p(diffs) -> float:
    """Two-sided paired t-test p-value (one-sample t on the differences); NaN when undefined."""
    from scipy.stats import ttest_1samp

    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2:
        return math.nan
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(ttest_1samp(d, 0.0).pvalue)


def paired_comparison(method, baseline, samples: int = 10000, seed: int = 0) -> dict:
    """Mean paired difference (method - baseline) with its 95% bootstrap CI, win rate and two p-values."""
    m, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if m.shape != b.shape or m.ndim != 1 or m.size == 0:
        raise ValueError(f"paired scores need equal non-empty 1-D shapes, got {m.shape} and {b.shape}")
    d = m - b
    low, high = bootstrap_ci(d, samples=samples, seed=seed)
    return {"diff_mean": float(d.mean()), "diff_std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
            "ci95_low": low, "ci95_high": high, "win_rate": win_rate(d),
            "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum()),
            "wilcoxon_p": wilcoxon_p(d), "ttest_p": ttest_p(d)}


def share_of_gain(gain: float | None, reference_gain: float | None, reference_ci: tuple[float, float] | None):
    """`gain` as a share of `reference_gain` (gnsnet's gain over the oracle's), or None where that share means
    nothing: no reference, or a reference whose 95% CI contains 0 (dividing by a gain that may be nothing gives
    shares like -2781%). Tables show None as '—', CSV files as an empty cell."""
    if gain is None or reference_gain is None or reference_ci is None:
        return None
    low, high = reference_ci
    if low <= 0 <= high or reference_gain == 0:
        return None
    return gain / reference_gain
