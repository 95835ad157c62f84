"""Scaling fits with intervals and plain-word verdicts.

Error E = 1 - AUROC against an axis x (parameters or resolution). With three or more distinct x,
a power law E = A * x^(-alpha) is fitted in log-log space; its interval comes from a parametric
bootstrap that redraws every point from its own confidence interval. A verdict is only as strong
as that interval: if it straddles zero the answer is "no reliable trend", and with fewer than
three points there is no exponent at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_POINTS = 3


@dataclass
class ScalingFit:
    axis: str
    n_points: int
    alpha: float | None  # error ~ x^(-alpha): alpha > 0 means bigger is better
    alpha_low: float | None
    alpha_high: float | None
    amplitude: float | None
    verdict: str

    def predict_metric(self, x: np.ndarray) -> np.ndarray:
        return 1 - self.amplitude * np.asarray(x, dtype=float) ** (-self.alpha)


def _fit_loglog(x: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.log(x), np.log(np.clip(err, 1e-6, None)), 1)
    return -slope, float(np.exp(intercept))


def fit_power_law(x, metric, low, high, axis: str, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> ScalingFit:
    """``metric`` is higher-is-better in [0, 1] (AUROC); ``low``/``high`` its per-point interval."""
    x, metric, low, high = (np.asarray(a, dtype=float) for a in (x, metric, low, high))
    order = np.argsort(x)
    x, metric, low, high = x[order], metric[order], low[order], high[order]
    n = len(np.unique(x))
    if n < MIN_POINTS:
        return ScalingFit(axis, n, None, None, None, None, f"too few points to fit ({n} < {MIN_POINTS}); {_pairwise(x, metric, low, high)}")
    alpha, amp = _fit_loglog(x, 1 - metric)
    sd = np.maximum((high - low) / (2 * 1.96), 1e-4)
    rng = np.random.default_rng(seed)
    draws = np.clip(metric + rng.normal(0, 1, (resamples, len(x))) * sd, 0, 1 - 1e-6)
    alphas = np.array([_fit_loglog(x, 1 - d)[0] for d in draws])
    a_lo, a_hi = np.quantile(alphas, [(1 - level) / 2, 1 - (1 - level) / 2])
    return ScalingFit(axis, n, float(alpha), float(a_lo), float(a_hi), amp, _verdict(x, metric, low, high, a_lo, a_hi, axis))


def _pairwise(x, metric, low, high) -> str:
    if len(x) < 2:
        return "a single point"
    if low[-1] > high[0]:
        return f"the largest {x[-1]:g} beats the smallest {x[0]:g} (intervals do not overlap)"
    if high[-1] < low[0]:
        return f"the largest {x[-1]:g} is worse than the smallest {x[0]:g} (intervals do not overlap)"
    return "the intervals overlap"


def _verdict(x, metric, low, high, a_lo, a_hi, axis) -> str:
    best = int(np.argmax(metric))
    if 0 < best < len(x) - 1 and low[best] > max(high[0], high[-1]):
        return f"peaks at {axis}={x[best]:g}"
    if a_lo > 0:
        # saturation: the last step gains less than its own uncertainty
        if len(x) >= 3 and high[-2] >= low[-1]:
            return f"improves, saturating beyond {axis}={x[-2]:g}"
        return f"improves with {axis}"
    if a_hi < 0:
        return f"degrades with {axis}"
    return f"no reliable trend with {axis} (exponent interval includes 0)"
