"""Scaling fits with bootstrap intervals and plain-word verdicts.

A curve is a few points (x, metric) plus a matrix of bootstrap draws of the metric at every point,
shape (resamples, points). The draws carry all the uncertainty: over patients (paired across the
points when per-sample predictions exist), over seeds, or redrawn from each point's own interval.

* The **verdict** is model-free: it compares points through their paired draws (improves /
  saturates beyond X / peaks at X / degrades / no reliable trend), so it never rests on a
  functional form the data cannot support.
* The **fit** is on an error E: E = 1 - metric for a higher-is-better metric in [0, 1] (AUROC, Dice),
  E = metric itself for a lower-is-better one (VOI, HD95: already an error, >= 0; no transform and
  no sign flip). Verdicts judge -E, so "improves" always means the metric gets better. The law is a
  saturating power law E = floor + A * x^(-alpha) with a robust loss (soft L1). The point fit
  starts from a global profile over alpha plus generic starts and is polished by scipy's
  least_squares; every draw is refitted by the (vectorised) profile for intervals on the
  parameters and on the curve. It needs MIN_POINTS distinct x: with fewer there is no exponent at all, and the
  verdict says "too few points to fit". A one-break broken power law is fitted where
  MIN_POINTS_BROKEN points exist, and a leave-largest-out check says whether the law extrapolates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from scipy.optimize import least_squares

from dinoscale.analysis.sources import NO_INTERVALS

MIN_POINTS = 4  # the saturating law has 3 parameters: one spare point at the very least
MIN_POINTS_BROKEN = 6  # the broken law has 4 parameters and needs 2 points on each side of the break
MIN_POINTS_EXTRAPOLATION = MIN_POINTS + 1  # the held-in points must themselves be fittable
FIT_RESAMPLES = 400  # refits per curve for the intervals (vectorised: cheap)
_MONOTONE = ("improves", "saturates", "degrades")
_ALPHA_BOUND = 5.0  # |alpha| beyond this is not a scaling law but a step
_ERR_SD_FLOOR = 1e-3  # a point known "exactly" would otherwise dominate the weighted loss
# A fitted parameter this close to an optimiser bound (relative to the bound's range) is where the optimiser
# stopped, not an estimate: reported "not identified" instead of a number.
_AT_BOUND = 0.01
NOT_IDENTIFIED = "not identified"


def to_error(values, goal: str = "max"):
    """The fitted error: 1 - metric for a higher-is-better metric in [0, 1], the metric itself for a
    lower-is-better one (it is already an error). Its own inverse, so it also maps errors back."""
    values = np.asarray(values, dtype=float)
    if goal not in ("max", "min"):
        raise ValueError(f"goal must be 'max' or 'min', not {goal!r}")
    return 1 - values if goal == "max" else values


def error_words(goal: str, metric: str = "metric") -> str:
    return f"E = 1 - {metric}" if goal == "max" else f"E = {metric} (lower is better: fitted as it is)"


def _error_upper(goal: str) -> float:
    return 1.0 if goal == "max" else np.inf


@dataclass
class Extrapolation:
    """Leave-largest-out: fit without the largest x, predict it, compare with what was measured."""

    x: float
    predicted: float
    predicted_low: float
    predicted_high: float
    observed: float
    observed_low: float
    observed_high: float

    @property
    def consistent(self) -> bool:
        return self.predicted_low <= self.observed_high and self.observed_low <= self.predicted_high

    def describe(self, axis: str) -> str:
        head = (
            f"fitted without {axis}={self.x:.3g}, the law predicts {self.predicted:.3f} "
            f"[{self.predicted_low:.3f}, {self.predicted_high:.3f}]; measured {self.observed:.3f} "
            f"[{self.observed_low:.3f}, {self.observed_high:.3f}]"
        )
        return head + (" - consistent" if self.consistent else " - the law does NOT extrapolate")


@dataclass
class BrokenFit:
    """log E = c - alpha_before * min(u, u_b) - alpha_after * max(u - u_b, 0), u = log x."""

    break_x: float
    alpha_before: float
    alpha_after: float
    delta_aicc: float  # AICc(saturating) - AICc(broken): > 2 means the break is supported


@dataclass
class ScalingFit:
    axis: str
    n_points: int
    alpha: float | None  # error ~ x^(-alpha): alpha > 0 means bigger is better
    alpha_low: float | None
    alpha_high: float | None
    amplitude: float | None  # A in the axis' own units
    verdict: str
    trend: str = "no_trend"  # improves | saturates | peaks | degrades | no_trend | too_few_points
    floor: float | None = None  # irreducible error of the saturating law (see ``goal``: 1 - metric, or the metric)
    floor_low: float | None = None
    floor_high: float | None = None
    band: dict[str, np.ndarray] | None = None  # x, metric (median), low, high of the fitted curve
    broken: BrokenFit | None = None
    extrapolation: Extrapolation | None = None
    resamples_fitted: int = 0
    notes: list[str] = field(default_factory=list)
    goal: str = "max"  # of the metric: "max" (error = 1 - metric) or "min" (error = metric)

    @property
    def fitted(self) -> bool:
        return self.alpha is not None

    floor_upper: float = 1.0  # the optimiser's upper bound on the floor (its lower bound is 0)

    @property
    def alpha_identified(self) -> bool:
        """The exponent and both ends of its interval stay off the optimiser's bounds (+-``_ALPHA_BOUND``)."""
        return self.fitted and all(
            abs(v) < _ALPHA_BOUND * (1 - _AT_BOUND) for v in (self.alpha, self.alpha_low, self.alpha_high)
        )

    @property
    def floor_identified(self) -> bool:
        """The floor's point estimate stays off its bounds (0 and ``floor_upper``)."""
        return (
            self.fitted
            and self.floor is not None
            and _AT_BOUND * 1e-4 * self.floor_upper < self.floor < self.floor_upper * (1 - _AT_BOUND)
        )

    @property
    def exponent_identified(self) -> bool:
        """Worth quoting: fitted, a reliable monotone trend, and an interval that stays off the search bounds."""
        return self.alpha_identified and self.trend in _MONOTONE

    def alpha_interval_words(self) -> str:
        """The exponent's interval, an end at an optimiser bound said as such: ``[-0.0125, +5 (its bound)]``."""

        def end(v: float) -> str:
            return f"{v:+g} (its bound)" if abs(v) >= _ALPHA_BOUND * (1 - _AT_BOUND) else f"{v:.3g}"

        return f"[{end(self.alpha_low)}, {end(self.alpha_high)}]" if self.fitted else ""

    def alpha_words(self) -> str:
        """``alpha 0.086 [0.025, 0.61]``, or ``alpha not identified [0.0099, +5 (its bound)]``."""
        if not self.fitted:
            return "no exponent"
        point = f"{self.alpha:.3g}" if self.alpha_identified else NOT_IDENTIFIED
        return f"alpha {point} {self.alpha_interval_words()}"

    def predict_metric(self, x: np.ndarray) -> np.ndarray:
        return to_error((self.floor or 0.0) + self.amplitude * np.asarray(x, dtype=float) ** (-self.alpha), self.goal)


# ---------------------------------------------------------------- verdicts (model-free)


def _reliably_greater(draws: np.ndarray, a: int, b: int, level: float) -> bool:
    """Is point a better than point b? The paired difference's interval must exclude zero."""
    diff = draws[:, a] - draws[:, b]
    diff = diff[np.isfinite(diff)]
    return len(diff) > 0 and float(np.quantile(diff, (1 - level) / 2)) > 0


def _saturation_point(x: np.ndarray, draws: np.ndarray, level: float) -> int | None:
    """The first x beyond which no larger x is reliably better AND the gain per log-x reliably dropped.

    Both are needed: "not reliably better" alone is also what a steady gain in small steps looks like.
    """
    u = np.log(x)
    for k in range(1, len(x) - 1):
        if any(_reliably_greater(draws, j, k, level) for j in range(k + 1, len(x))):
            continue
        before = (draws[:, k] - draws[:, 0]) / (u[k] - u[0])
        after = (draws[:, -1] - draws[:, k]) / (u[-1] - u[k])
        drop = (before - after)[np.isfinite(before - after)]
        if len(drop) and float(np.quantile(drop, (1 - level) / 2)) > 0:
            return k
    return None


def judge_trend(
    x: np.ndarray, metric: np.ndarray, draws: np.ndarray, axis: str, level: float = 0.95
) -> tuple[str, str]:
    """(trend, words) for points sorted by x; ``draws`` (resamples, points) of the higher-is-better metric."""
    n = len(x)
    if n < 2:
        return "too_few_points", "a single point"
    best = int(np.argmax(metric))
    last = n - 1
    if 0 < best < last and _reliably_greater(draws, best, 0, level) and _reliably_greater(draws, best, last, level):
        return "peaks", f"peaks at {axis}={x[best]:.3g}"
    if _reliably_greater(draws, last, 0, level):
        k = _saturation_point(x, draws, level)
        if k is not None:
            return "saturates", f"improves with {axis}, saturates beyond {axis}={x[k]:.3g}"
        return "improves", f"improves with {axis}"
    if _reliably_greater(draws, 0, last, level):
        return "degrades", f"degrades with {axis}"
    return "no_trend", f"no reliable trend with {axis} (intervals overlap)"


POINT_TRENDS = ("better_larger", "worse_larger", "best_inside", "flat")  # what points alone can say


def describe_points(x, metric, axis: str, goal: str = "max") -> ScalingFit:
    """A curve whose points have no intervals: what the points say, in words that claim no reliability
    (better / worse at larger x, best inside the range, no change) and no exponent, labelled as such."""
    x, metric = np.asarray(x, float), np.asarray(metric, float)
    order = np.argsort(x)
    x, score = x[order], metric[order] * (1 if goal == "max" else -1)
    n = len(x)
    if n < 2:
        trend, words = "too_few_points", "a single point"
    elif np.ptp(score) == 0:
        trend, words = "flat", f"the same at every {axis}"
    else:
        best = int(np.argmax(score))
        if 0 < best < n - 1 and score[best] > max(score[0], score[-1]):
            trend, words = "best_inside", f"best at {axis}={x[best]:.3g}"
        elif score[-1] > score[0]:
            trend, words = "better_larger", f"better at larger {axis}"
        elif score[-1] < score[0]:
            trend, words = "worse_larger", f"worse at larger {axis}"
        else:
            trend, words = "flat", f"no net change with {axis}"
    return ScalingFit(
        axis, n, None, None, None, None, f"{words} ({NO_INTERVALS})", trend=trend, goal=goal, notes=[NO_INTERVALS]
    )


# ---------------------------------------------------------------- model families (on error, u = log x)


def _saturating(theta, u):
    floor, log_a, alpha = theta
    return floor + np.exp(log_a - alpha * u)


def _broken(theta, u):
    c, a1, a2, ub = theta
    return np.exp(c - a1 * np.minimum(u, ub) - a2 * np.maximum(u - ub, 0.0))


def _saturating_jac(theta, u):
    floor, log_a, alpha = theta
    e = np.exp(log_a - alpha * u)
    return np.stack([np.ones_like(u), e, -u * e], axis=1)


def _broken_jac(theta, u):
    c, a1, a2, ub = theta
    e = _broken(theta, u)
    beyond = (u > ub).astype(float)
    return np.stack([e, -e * np.minimum(u, ub), -e * np.maximum(u - ub, 0.0), e * (a1 - a2) * beyond], axis=1)


def _saturating_starts(u, err):
    """Generic starts (improving, degrading, steep with a floor), each through the first point."""
    starts = []
    for alpha, floor in ((0.3, 0.0), (-0.3, 0.0), (1.0, 0.5 * err.min())):
        log_a = np.log(max(err[0] - floor, 1e-6)) + alpha * u[0]
        starts.append(np.array([floor, log_a, alpha]))
    return starts


def _saturating_bounds(u, err):
    # an error of a [0, 1] score is at most 1; an error-like metric (VOI) can exceed it
    return np.array([0.0, -50.0, -_ALPHA_BOUND]), np.array([max(1.0, float(np.max(err))), 50.0, _ALPHA_BOUND])


def _broken_starts(u, err):
    starts = []
    le = np.log(np.clip(err, 1e-6, None))
    for i in range(2, len(u) - 2 + 1):
        ub = u[i - 1]
        a1 = -np.polyfit(u[:i], le[:i], 1)[0]
        a2 = -np.polyfit(u[i - 1 :], le[i - 1 :], 1)[0]
        starts.append(np.array([le[i - 1] + a1 * ub, a1, a2, ub]))
    return starts


def _broken_bounds(u, err):
    # at least two points on each side of the break
    return (np.array([-50.0, -_ALPHA_BOUND, -_ALPHA_BOUND, u[1]]), np.array([50.0, _ALPHA_BOUND, _ALPHA_BOUND, u[-2]]))


_FAMILIES = {  # model, starts, bounds, jacobian
    "saturating": (_saturating, _saturating_starts, _saturating_bounds, _saturating_jac),
    "broken": (_broken, _broken_starts, _broken_bounds, _broken_jac),
}


def _least_squares(family: str, u, err, sd, starts) -> tuple[np.ndarray, float] | None:
    """Robust weighted fit; the best of several starts (the loss surface has several basins)."""
    model, _, bounds, jac = _FAMILIES[family]
    lo, hi = bounds(u, err)
    best = None
    for theta0 in starts:
        theta0 = np.clip(theta0, lo + 1e-9, hi - 1e-9)
        try:
            r = least_squares(
                lambda t: (model(t, u) - err) / sd,
                theta0,
                jac=lambda t: jac(t, u) / sd[:, None],
                bounds=(lo, hi),
                loss="soft_l1",
                f_scale=1.0,
                x_scale="jac",
                max_nfev=100,
            )
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(r.x)) and (best is None or r.cost < best[1]):
            best = (r.x, float(r.cost))
    return best


def _aicc(family: str, theta, u, err, sd) -> float:
    model = _FAMILIES[family][0]
    k, n = len(theta), len(u)
    rss = float(np.sum(((model(theta, u) - err) / sd) ** 2))
    if n - k - 1 <= 0:
        return np.inf
    return n * np.log(max(rss, 1e-12) / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


# ---------------------------------------------------------------- fitting with bootstrap


def _error_draws(draws: np.ndarray, goal: str = "max") -> tuple[np.ndarray, np.ndarray]:
    err_draws = to_error(draws, goal)
    sd = np.maximum(np.nanstd(err_draws, axis=0), _ERR_SD_FLOOR)
    return err_draws, sd


_ALPHA_COARSE = np.linspace(-_ALPHA_BOUND, _ALPHA_BOUND, 201)  # step 0.05, then refined per draw
_ALPHA_FINE = np.linspace(-0.05, 0.05, 41)  # step 0.0025 around the coarse minimum


def _soft_l1(r: np.ndarray) -> np.ndarray:
    return 2 * (np.sqrt(1 + r * r) - 1)


def _solve_linear_part(alphas, u, e, w, sd):
    """For every alpha (D, A): the best (floor >= 0, A >= 0) in closed form, and the soft-L1 loss."""
    g = np.exp(-alphas[..., None] * u)  # (D|1, A, n)
    sw, sg, sgg = w.sum(-1), (w * g).sum(-1), (w * g * g).sum(-1)
    se, sge = (w * e).sum(-1), (w * g * e).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        det = sw * sgg - sg**2
        amp = (sw * sge - sg * se) / det
        floor = (sgg * se - sg * sge) / det
        pinned = floor < 0  # floor at its bound: A alone
        amp = np.where(pinned, sge / sgg, amp)
        floor = np.where(pinned, 0.0, floor)
        # no power-law part at all: a constant (also at alpha = 0, where floor and A are one parameter)
        flat = ~(amp > 0) | ~np.isfinite(amp) | (np.abs(det) <= 1e-9 * sw * sgg)
        floor = np.maximum(np.where(flat, se / sw, floor), 0)
        amp = np.where(flat, 0.0, amp)
    r = (floor[..., None] + amp[..., None] * g - e) / sd
    return floor, amp, r


def _profile_saturating(u, err, sd, iterations: int = 3) -> np.ndarray:
    """Saturating-law fits of many error vectors at once, (D, n) -> (D, 3) thetas.

    For a fixed alpha the law is linear in (floor, A), so it is solved in closed form for every alpha
    of a grid; the soft-L1 loss picks alpha (coarse grid, then a fine one around the minimum), and a
    few reweighting rounds make the inner fit robust too. Hundreds of refits cost what a handful of
    iterative least-squares runs would, and no draw is stuck in a local basin.
    """
    err = np.atleast_2d(err)
    e = err[:, None, :]
    rows = np.arange(len(err))
    w = np.broadcast_to(1 / sd**2, err.shape)[:, None, :]
    for _ in range(iterations):
        _, _, r = _solve_linear_part(_ALPHA_COARSE[None], u, e, w, sd)
        best = np.argmin(_soft_l1(r).sum(-1), axis=1)
        w = (1 / np.sqrt(1 + r[rows, best] ** 2) / sd**2)[:, None, :]  # IRLS weights of the soft-L1 loss
    fine = np.clip(_ALPHA_COARSE[best][:, None] + _ALPHA_FINE[None], -_ALPHA_BOUND, _ALPHA_BOUND)  # (D, F)
    floor, amp, r = _solve_linear_part(fine, u, e, w, sd)
    k = np.argmin(_soft_l1(r).sum(-1), axis=1)
    return np.column_stack([floor[rows, k], np.log(np.maximum(amp[rows, k], 1e-12)), fine[rows, k]])


def _bootstrap_thetas(u, err_draws, sd, resamples, rng) -> np.ndarray:
    rows = rng.choice(len(err_draws), size=min(resamples, len(err_draws)), replace=False)
    e = err_draws[rows]
    e = e[np.all(np.isfinite(e), axis=1)]
    return _profile_saturating(u, e, sd) if len(e) else np.empty((0, 3))


def _point_fit(u, err, sd) -> tuple[np.ndarray, float] | None:
    """Global start from the alpha profile, polished by scipy's robust least squares; two generic
    starts guard against a profile minimum on a grid edge."""
    start = _profile_saturating(u, err, sd)[0]
    return _least_squares("saturating", u, err, sd, [start] + _saturating_starts(u, err))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    q = (1 - level) / 2
    lo, hi = np.quantile(values, [q, 1 - q])
    return float(lo), float(hi)


def _extrapolation(x, metric, draws, level, resamples, rng, goal: str = "max") -> Extrapolation | None:
    u_ref = float(np.mean(np.log(x[:-1])))
    u, err = np.log(x[:-1]) - u_ref, to_error(metric[:-1], goal)
    err_draws, sd = _error_draws(draws[:, :-1], goal)
    fit = _point_fit(u, err, sd)
    if fit is None:
        return None
    thetas = _bootstrap_thetas(u, err_draws, sd, resamples, rng)
    u_last = np.log(x[-1]) - u_ref
    top = _error_upper(goal)
    pred = to_error(np.clip(_saturating(thetas.T, u_last), 0, top), goal)
    if len(pred) < 10:
        return None
    lo, hi = _interval(pred, level)
    olo, ohi = _interval(draws[:, -1][np.isfinite(draws[:, -1])], level)
    point = float(to_error(np.clip(_saturating(fit[0], u_last), 0, top), goal))
    return Extrapolation(float(x[-1]), point, lo, hi, float(metric[-1]), olo, ohi)


def fit_curve(
    x, metric, draws, axis: str, level: float = 0.95, resamples: int = FIT_RESAMPLES, seed: int = 0, goal: str = "max"
) -> ScalingFit:
    """Fit one curve. ``metric``: higher-is-better in [0, 1] (``goal='max'``) or lower-is-better and >= 0
    (``goal='min'``); ``draws`` (B, points) its bootstrap draws. Verdicts and the law are on the error
    (``to_error``), so "improves" always means the metric gets better."""
    x, metric, draws = np.asarray(x, float), np.asarray(metric, float), np.asarray(draws, float)
    order = np.argsort(x)
    x, metric, draws = x[order], metric[order], draws[:, order]
    if len(np.unique(x)) != len(x):
        raise ValueError(f"fit_curve({axis}): x values must be distinct (average cells sharing an x first): {x}")
    n = len(x)
    u_ref = float(np.mean(np.log(x)))  # centring log x keeps A and alpha decoupled in the fit
    u, err = np.log(x) - u_ref, to_error(metric, goal)
    err_draws, sd = _error_draws(draws, goal)
    trend, words = judge_trend(x, -err, -err_draws, axis, level)  # -error: higher is better, whatever the goal
    if n < MIN_POINTS:
        why = "a single point" if n < 2 else words
        return ScalingFit(
            axis,
            n,
            None,
            None,
            None,
            None,
            f"too few points to fit ({n} < {MIN_POINTS} distinct {axis} values); the points alone: {why}",
            trend="too_few_points" if n < 2 else trend,
            goal=goal,
        )
    rng = np.random.default_rng(seed)
    point = _point_fit(u, err, sd)
    if point is None:
        return ScalingFit(
            axis,
            n,
            None,
            None,
            None,
            None,
            f"{words}; the power-law fit failed",
            trend=trend,
            notes=["least squares did not converge from any start"],
            goal=goal,
        )
    theta = point[0]
    thetas = _bootstrap_thetas(u, err_draws, sd, resamples, rng)
    amplitude = float(np.exp(theta[1] + theta[2] * u_ref))  # A in the axis' own units
    fit = ScalingFit(
        axis,
        n,
        float(theta[2]),
        *_interval(thetas[:, 2], level),
        amplitude,
        words,
        trend=trend,
        floor=float(theta[0]),
        resamples_fitted=len(thetas),
        goal=goal,
    )
    fit.floor_low, fit.floor_high = _interval(thetas[:, 0], level)
    fit.floor_upper = float(_saturating_bounds(u, err)[1][0])
    _agree_with_the_interval(fit, x)
    fit.band = _curve_band(x, u_ref, thetas, level, goal)
    if n >= MIN_POINTS_BROKEN:
        fit.broken = _fit_broken(u, err, sd, theta, u_ref)
    if (
        n >= MIN_POINTS_EXTRAPOLATION and fit.trend in _MONOTONE
    ):  # a law that does not describe the data cannot extrapolate it
        fit.extrapolation = _extrapolation(x, metric, draws, level, resamples, rng, goal)
    if trend == "peaks":
        fit.notes.append("a saturating power law cannot peak: its exponent is not a description of this curve")
    return fit


def _agree_with_the_interval(fit: ScalingFit, x: np.ndarray) -> None:
    """The model-free verdict and the fitted exponent's interval must say the same thing: an improvement whose
    exponent interval reaches 0 or below (or a degradation whose interval reaches 0 or above) is not reliable,
    and the verdict says so instead of the paired comparison's "improves" / "degrades"."""
    better = fit.trend in ("improves", "saturates")
    if not ((better and fit.alpha_low <= 0) or (fit.trend == "degrades" and fit.alpha_high >= 0)):
        return
    ends = f"{fit.axis}={x[-1]:.3g} scores {'above' if better else 'below'} {fit.axis}={x[0]:.3g} on paired resamples"
    fit.notes.append(f"the paired comparison alone says '{fit.verdict}'")
    fit.trend = "no_trend"
    fit.verdict = (
        f"no reliable trend with {fit.axis}: {ends}, but the fitted exponent's interval "
        f"{fit.alpha_interval_words()} includes 0"
    )


def _curve_band(x, u_ref, thetas, level, goal: str = "max") -> dict[str, np.ndarray]:
    grid = np.geomspace(x[0], x[-1], 60)
    curves = to_error(np.array([_saturating(t, np.log(grid) - u_ref) for t in thetas]), goal)
    lo, hi = np.quantile(curves, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return {"x": grid, "metric": np.median(curves, axis=0), "low": lo, "high": hi}


def _fit_broken(u, err, sd, theta_saturating, u_ref) -> BrokenFit | None:
    fit = _least_squares("broken", u, err, sd, _broken_starts(u, err))
    if fit is None:
        return None
    c, a1, a2, ub = fit[0]
    delta = _aicc("saturating", theta_saturating, u, err, sd) - _aicc("broken", fit[0], u, err, sd)
    return BrokenFit(float(np.exp(ub + u_ref)), float(a1), float(a2), float(delta))


def fit_power_law(
    x, metric, low, high, axis: str, resamples: int = 2000, level: float = 0.95, seed: int = 0, goal: str = "max"
) -> ScalingFit:
    """A curve known only through each point's interval: draws are redrawn independently from it."""
    metric, low, high = (np.asarray(a, dtype=float) for a in (metric, low, high))
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    sd = np.maximum((high - low) / (2 * z), 1e-4)
    draws = metric + np.random.default_rng(seed).normal(0, 1, (resamples, len(metric))) * sd
    draws = np.clip(draws, 0, 1) if goal == "max" else np.clip(draws, 0, None)  # a score in [0, 1]; an error >= 0
    return fit_curve(x, metric, draws, axis, level=level, seed=seed, goal=goal)
