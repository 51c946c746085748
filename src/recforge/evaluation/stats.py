"""Uncertainty: bootstrap confidence intervals of means and paired tests between models."""

from __future__ import annotations

import numpy as np
from scipy import stats as _st

from recforge.errors import DataError


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0, chunk: int = 64,
    denominators: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (resampling users with replacement), or
    with ``denominators`` of the ratio ``Σ values / Σ denominators`` (resampling the pairs)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise DataError("cannot bootstrap an empty sample")
    if not 0 < confidence < 1:
        raise DataError("confidence must be in (0, 1)")
    d = None if denominators is None else np.asarray(denominators, dtype=np.float64)
    if d is not None and d.shape != x.shape:
        raise DataError(f"denominators must match the values' shape {x.shape}, got {d.shape}")
    if x.size == 1:
        value = float(x[0]) if d is None else float(x[0] / d[0]) if d[0] else 0.0
        return value, value
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    # Chunks bound memory: chunk × n indices at a time.
    step = max(1, min(chunk, 2**24 // x.size))
    for lo in range(0, n_boot, step):
        hi = min(n_boot, lo + step)
        idx = rng.integers(0, x.size, size=(hi - lo, x.size))
        if d is None:
            means[lo:hi] = x[idx].mean(axis=1)
        else:
            total = d[idx].sum(axis=1)
            means[lo:hi] = np.divide(x[idx].sum(axis=1), total, out=np.zeros(hi - lo), where=total != 0)
    alpha = (1 - confidence) / 2
    lo_q, hi_q = np.quantile(means, [alpha, 1 - alpha])
    return float(lo_q), float(hi_q)


def paired_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of a paired t-test on per-user values of two models (same users, same order).

    Returns 1.0 when the two are identical for every user (no evidence of a difference).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise DataError("paired test needs the same users in both samples")
    d = x - y
    if x.size < 2 or np.allclose(d, d[0]) and d[0] == 0:
        return 1.0
    if np.allclose(d, d.mean()):
        return 0.0  # a constant non-zero difference: as certain as it gets
    return float(_st.ttest_rel(x, y).pvalue)
