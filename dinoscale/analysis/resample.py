"""Bootstrap draws of every cell's seed-averaged metric, paired across cells where possible.

A *cell* is one configuration (modality, dataset, probe, strategy, backbone, resolution) over its
seeds. Its draws combine two sources of noise:

* **patients**: where runs logged per-sample predictions, one patient resample (all of a patient's
  images or volumes together, ``dinoscale.metrics._patient_resamples``) is drawn per replicate and
  applied to *every* run scored on the same test set, so differences between cells (the points of a
  curve, frozen vs LoRA) are paired. The headline is recomputed on each resample: macro AUROC from
  labels and scores, or for a per-volume headline (Dice, VOI...) the mean of its per-volume column
  (NaN values skipped, as ``dinoscale.metrics.mean_score``);
* otherwise each run is redrawn independently from its own logged interval (normal approximation);

and then **replicates** (the seed axis: initialisation, and the train / val split each replicate draws):
each bootstrap draw averages the cell's replicates resampled with replacement, their deviations from the
draw's mean inflated by sqrt(R / (R - 1)) (the bootstrap of a mean of R values underestimates its spread by
(R - 1) / R). A cell's interval thus carries test sampling, training and selection variance; with one
replicate it carries test sampling alone (and says so).

Two rules of ``dinoscale.metrics`` hold here as in the trial: the class set of a macro AUROC is fixed before
resampling (classes with at least ``macro_min_patients`` positive and negative test patients; a resample
in which one of them is single-valued is dropped), and a test set of fewer than ``min_interval_units``
patients is not resampled at all: its runs' draws are NaN, so the cell has no interval (``low`` / ``high``
NaN; ``uncertainty`` says why) and what rests on it rests on point estimates only, as in the trial.

Run tables come in as ``sources`` gives them (metric columns named for the headline) and are
turned into the internal naming (``metric``, ``metric_ci_low``, ...) by ``sources.as_generic``.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.analysis.sources import as_generic
from dinoscale.headline import AUROC, Headline
from dinoscale.metrics import (
    FRAME_METRICS,
    MACRO_MIN_PATIENTS,
    MIN_INTERVAL_UNITS,
    NEGATIVE_PATIENTS,
    NEGATIVE_UNITS,
    _patient_resamples,
    auroc_per_class,
    frame_metrics,
    macro_class_set,
)

CELL_KEYS = list(record.CELL_KEYS)  # modality, dataset, probe, strategy, backbone, n_params, resolution (+ new axes)
METRIC = "metric"  # the headline's test value in the internal naming (sources.as_generic)
METRIC_CI = record.ci_names(METRIC)


@dataclass
class CellDraws:
    cells: pd.DataFrame  # one row per cell: CELL_KEYS, metric, low, high, seeds, uncertainty, pairing, ...
    draws: np.ndarray  # (resamples, len(cells)) draws of each cell's seed-averaged metric
    level: float
    headline: Headline = field(default=AUROC)  # what "metric" is, and whether higher or lower is better

    def columns(self, index) -> np.ndarray:
        return self.draws[:, np.asarray(index)]


def _aligned(preds: pd.DataFrame, order: pd.Index) -> pd.DataFrame:
    return preds.set_index("sample_id").loc[order]


def _shared_patients(preds: list[pd.DataFrame], resamples: int, rng):
    """The runs' predictions aligned on the first run's sample order, and its patient resamples."""
    base = preds[0].set_index("sample_id")
    order = base.index
    patients = base["patient_id"].astype(str).to_numpy()
    draws = _patient_resamples(patients, resamples, seed=int(rng.integers(2**63)))
    return [_aligned(p, order) for p in preds], draws


def _fixed_classes(p: pd.DataFrame, k: int, negatives: str = NEGATIVE_PATIENTS) -> list[str]:
    """A run's macro class set, fixed before resampling, as the trial fixed it (``metrics.macro_class_set``
    with the run's rule of negatives, falling back to k = 1 when no class reaches k)."""
    classes = [c[len("label_") :] for c in p.columns if c.startswith("label_")]
    y, pid = p[[f"label_{c}" for c in classes]].to_numpy(float), p["patient_id"].astype(str).to_numpy()
    keep = macro_class_set(y, pid, k, negatives)
    if not keep.any():
        keep = macro_class_set(y, pid, 1, negatives)
    return [c for c, kept in zip(classes, keep) if kept]


def _patient_draws(
    preds: list[pd.DataFrame], resamples: int, rng, ks: list[int] | None = None, rules: list[str] | None = None
) -> np.ndarray:
    """(resamples, runs) macro AUROC under shared patient resamples; all runs share one test set. Each run's
    class set is fixed before resampling (``ks``: its macro_min_patients); a resample in which one of its
    classes is single-valued is NaN for that run (dropped from its quantiles)."""
    aligned, draws = _shared_patients(preds, resamples, rng)
    ks = ks or [MACRO_MIN_PATIENTS] * len(preds)
    labels, scores, owner = [], [], []
    for j, p in enumerate(aligned):
        classes = _fixed_classes(p, ks[j], (rules or [NEGATIVE_PATIENTS] * len(preds))[j])
        labels.append(p[[f"label_{c}" for c in classes]].to_numpy(float))
        scores.append(p[[f"score_{c}" for c in classes]].to_numpy(float))
        owner += [j] * len(classes)
    y, s, owner = np.hstack(labels), np.hstack(scores), np.array(owner)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # each run's first class column
    out = np.empty((resamples, len(preds)))
    for b, idx in enumerate(draws):
        per_class = auroc_per_class(y[idx], s[idx])
        defined = np.isfinite(per_class)
        # macro over each run's fixed classes; NaN where one of them is undefined in this resample
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.add.reduceat(np.where(defined, per_class, 0), starts) / np.add.reduceat(
                np.ones_like(per_class), starts
            )
        out[b] = np.where(np.add.reduceat(~defined, starts) > 0, np.nan, mean)
    return out


def _frame_draws(preds: list[pd.DataFrame], name: str, resamples: int, rng) -> np.ndarray:
    """(resamples, runs) a frame metric (``metrics.FRAME_METRICS``: the argmax class of each frame's scores) under
    shared video resamples, as the trial's interval resamples videos."""
    aligned, draws = _shared_patients(preds, resamples, rng)
    per_run = []
    for p in aligned:
        classes = [c[len("label_") :] for c in p.columns if c.startswith("label_")]
        per_run.append(
            (p[[f"label_{c}" for c in classes]].to_numpy(float), p[[f"score_{c}" for c in classes]].to_numpy(float))
        )
    out = np.empty((resamples, len(preds)))
    for b, idx in enumerate(draws):
        out[b] = [frame_metrics(y[idx], s[idx])[name] for y, s in per_run]
    return out


def _volume_draws(preds: list[pd.DataFrame], column: str, resamples: int, rng) -> np.ndarray:
    """(resamples, runs) mean of a per-volume metric under shared patient resamples (NaN volumes skipped,
    NaN where a resample has no defined value: ``metrics.mean_score`` for every run at once)."""
    aligned, draws = _shared_patients(preds, resamples, rng)
    values = np.column_stack([p[column].to_numpy(float) for p in aligned])  # (samples, runs)
    out = np.empty((resamples, len(preds)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN column is NaN, as intended
        for b, idx in enumerate(draws):
            out[b] = np.nanmean(values[idx], axis=0)
    return out


def _test_set_signature(p: pd.DataFrame) -> str:
    ids = "\n".join(sorted(p["sample_id"].astype(str)))
    return hashlib.sha1(ids.encode()).hexdigest()[:12]


def metric_range(headline: Headline) -> tuple[float, float]:
    """Where the headline's values can lie: higher-is-better headlines are scores in [0, 1] (AUROC, Dice);
    lower-is-better ones are errors or distances, >= 0 (VOI, HD95, adapted Rand error)."""
    return (0.0, 1.0) if headline.goal == "max" else (0.0, np.inf)


def _interval_draws(row, resamples: int, level: float, rng, headline: Headline = AUROC) -> np.ndarray:
    """Draws from a run's logged interval; all NaN where it has none (or a zero-width one): its
    uncertainty is unknown and what rests on it is said to rest on point estimates only."""
    lo, hi = row[METRIC_CI[0]], row[METRIC_CI[1]]
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        return np.full(resamples, np.nan)
    sd = (hi - lo) / (2 * NormalDist().inv_cdf(1 - (1 - level) / 2))
    return np.clip(row[METRIC] + rng.normal(0, 1, resamples) * sd, *metric_range(headline))


def _usable(p: pd.DataFrame, headline: Headline) -> bool:
    """Predictions the headline can be recomputed from (others are left out; the run uses its interval)."""
    if headline.per_volume:
        return headline.name in p.columns
    return headline.name in (AUROC.name, *FRAME_METRICS) and any(c.startswith("label_") for c in p.columns)


def _run_constant(runs: pd.DataFrame, rid: str, column: str, default: int) -> int:
    """A protocol constant the run logged (``macro_min_patients``, ``min_interval_units``), else the default."""
    if column not in runs.columns:
        return default
    v = pd.to_numeric(runs.loc[runs["run_id"] == rid, column], errors="coerce").dropna()
    return int(v.iloc[0]) if len(v) else default


def run_draws(
    runs: pd.DataFrame,
    predictions: dict[str, pd.DataFrame],
    resamples: int,
    level: float,
    rng,
    headline: Headline = AUROC,
) -> tuple[np.ndarray, list[str]]:
    """Draws per run (``runs`` in the internal naming), and per run its pairing group ('' when drawn
    independently; 'units:<n>' when its test set is too small to resample: constant draws, no interval)."""
    out = np.empty((resamples, len(runs)))
    pairing = [""] * len(runs)
    position = {rid: i for i, rid in enumerate(runs["run_id"])}
    by_test_set: dict[str, list[str]] = {}
    for rid in runs["run_id"]:
        if rid in predictions and _usable(predictions[rid], headline):
            by_test_set.setdefault(_test_set_signature(predictions[rid]), []).append(rid)
    for signature, rids in by_test_set.items():
        preds = [predictions[r] for r in rids]
        ks = [_run_constant(runs, r, record.MACRO_MIN_PATIENTS, MACRO_MIN_PATIENTS) for r in rids]
        rules = [
            NEGATIVE_UNITS if _run_constant(runs, r, record.MACRO_NEGATIVES, 0) else NEGATIVE_PATIENTS for r in rids
        ]
        units = preds[0]["patient_id"].astype(str).nunique()
        need = max(_run_constant(runs, r, "min_interval_units", MIN_INTERVAL_UNITS) for r in rids)
        if units < need:  # no resampling of a handful of units: no interval (point estimates only)
            draws = np.full((resamples, len(preds)), np.nan)
            tag = f"units:{units}"
        else:
            if headline.per_volume:
                draws = _volume_draws(preds, headline.name, resamples, rng)
            elif headline.name in FRAME_METRICS:
                draws = _frame_draws(preds, headline.name, resamples, rng)
            else:
                draws = _patient_draws(preds, resamples, rng, ks, rules)
            tag = f"patients:{signature}"
        for j, rid in enumerate(rids):
            out[:, position[rid]] = draws[:, j]
            pairing[position[rid]] = tag
    streams = _run_streams(runs, rng)
    for i, row in enumerate(runs.to_dict("records")):
        if not pairing[i]:
            out[:, i] = _interval_draws(row, resamples, level, streams[i], headline)
    return out, pairing


def _run_streams(runs: pd.DataFrame, rng) -> list[np.random.Generator]:
    """One random stream per run for the draws from its own interval, keyed by its cell and its place among
    the cell's replicates (by seed), not by its row: the order of a table's rows does not change its report,
    and a report's own results.csv, read back, draws every cell as the report did."""
    base = int(rng.integers(2**63))
    cell = ["|".join(map(str, values)) for values in runs[CELL_KEYS].to_numpy(object)]
    seed = [str(v) for v in runs[record.REPLICATE_AXIS]]
    order = pd.DataFrame({"cell": cell, "seed": seed, "metric": runs[METRIC]}, index=runs.index).sort_values(
        ["cell", "seed", "metric"], kind="stable"
    )
    place = order.groupby("cell", sort=False).cumcount().reindex(runs.index)
    keys = [int(hashlib.sha1(f"{c}#{p}".encode()).hexdigest()[:15], 16) for c, p in zip(cell, place)]
    return [np.random.default_rng([base, k]) for k in keys]


def bootstrap_cells(
    runs: pd.DataFrame,
    predictions: dict[str, pd.DataFrame] | None = None,
    resamples: int = 500,
    level: float = 0.95,
    seed: int = 0,
    headline: Headline | None = None,
) -> CellDraws:
    """Seed-averaged cells with paired bootstrap draws (see the module docstring). ``headline``: which
    metric the run table holds (default: ``runs.attrs['headline']``, else detected from its columns)."""
    rng = np.random.default_rng(seed)
    runs, headline = as_generic(runs, headline or runs.attrs.get("headline"))
    runs = runs.reset_index(drop=True)
    # an optional axis a table does not state is at its default (sources.tidy_results says the same)
    runs = runs.assign(**{a: d for a, d in record.AXIS_DEFAULTS.items() if a not in runs})
    per_run, pairing = run_draws(runs, predictions or {}, resamples, level, rng, headline)
    runs = runs.assign(_pairing=pairing)
    rows, columns = [], []
    for key, g in runs.groupby(CELL_KEYS, sort=True, dropna=False):
        idx = g.index.to_numpy()
        if np.isnan(per_run[:, idx]).all(axis=0).any():  # a run of unknown uncertainty: so is the cell's
            cell = np.full(resamples, np.nan)
        else:
            cell = _replicate_draws(per_run[:, idx], rng)
        columns.append(cell)
        q = (1 - level) / 2
        low, high = _own_interval(g, headline) or (_quantile(cell, q), _quantile(cell, 1 - q))
        rows.append(
            {
                **dict(zip(CELL_KEYS, key)),
                "metric": g[METRIC].mean(),
                "low": low,
                "high": high,
                "seeds": _replicates(g),
                "val_metric": g["val_metric"].mean(),
                **dict(zip(("val_low", "val_high"), _own_val_interval(g))),
                "n_val": pd.to_numeric(g["n_val"], errors="coerce").mean() if "n_val" in g else np.nan,
                record.TOKENS_PER_IMAGE: pd.to_numeric(g[record.TOKENS_PER_IMAGE], errors="coerce").mean(),
                record.N_TRAIN_PATIENTS: _mean_of(g, record.N_TRAIN_PATIENTS),
                record.GFLOPS: pd.to_numeric(g[record.GFLOPS], errors="coerce").mean(),
                "uncertainty": _uncertainty_words(g),
                "pairing": ",".join(sorted(set(g["_pairing"]))),
            }
        )
    return CellDraws(pd.DataFrame(rows), np.column_stack(columns), level, headline)


def _mean_of(g: pd.DataFrame, column: str) -> float:
    return pd.to_numeric(g[column], errors="coerce").mean() if column in g else np.nan


def _own_val_interval(g: pd.DataFrame) -> tuple[float, float]:
    """A one-run cell's val interval as its trial logged it (over the val patients of its replicate); NaN for
    several runs (each validated on its own draw) or where none was logged."""
    cols = [c for c in record.ci_names("val_metric") if c in g]
    if len(g) != 1 or len(cols) != 2:
        return np.nan, np.nan
    lo, hi = (pd.to_numeric(g[c], errors="coerce").iloc[0] for c in cols)
    return float(lo), float(hi)


def _own_interval(g: pd.DataFrame, headline: Headline) -> tuple[float, float] | None:
    """A cell of one run shows the interval its trial logged (one interval per cell: the terminal, MLflow and the
    report agree to the last digit, and a report's cells read back from its results.csv keep theirs); its draws
    (patient resamples, or a normal approximation of the logged interval) still serve the comparisons and fits.
    None for a cell of several runs (replicates pooled: its interval comes from its draws)."""
    if len(g) != 1:
        return None
    lo, hi = float(g[METRIC_CI[0]].iloc[0]), float(g[METRIC_CI[1]].iloc[0])
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        return None
    return tuple(float(np.clip(v, *metric_range(headline))) for v in (lo, hi))


def _replicates(g: pd.DataFrame) -> int:
    """How many replicates a cell pools: its distinct seeds, or where the rows are a report's cells (a
    ``seeds`` column, as results.csv holds it) the replicates each row already pooled."""
    if "seeds" in g.columns:
        n = pd.to_numeric(g["seeds"], errors="coerce")
        if n.notna().all():
            return int(n.sum())
    return int(g[record.REPLICATE_AXIS].nunique())


def _replicate_draws(draws: np.ndarray, rng) -> np.ndarray:
    """(resamples, R) draws of a cell's R replicates -> (resamples,) draws of their mean: replicates resampled
    with replacement in every draw, deviations from the draw's mean inflated by sqrt(R / (R - 1))."""
    n, r = draws.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where AUROC is undefined stays NaN
        mean = np.nanmean(draws, axis=1)
        if r == 1:
            return mean
        pick = rng.integers(0, r, (n, r))
        resampled = np.nanmean(draws[np.arange(n)[:, None], pick], axis=1)
    return mean + np.sqrt(r / (r - 1)) * (resampled - mean)


def _quantile(draws: np.ndarray, q: float) -> float:
    return float(np.nanquantile(draws, q)) if np.isfinite(draws).any() else float("nan")


def _uncertainty_words(g: pd.DataFrame) -> str:
    n_rep = _replicates(g)
    small = g["_pairing"][g["_pairing"].str.startswith("units:")]
    if len(small):
        units = small.iloc[0].split(":", 1)[1]
        return f"none: {units} test unit(s), too few to resample (point estimates only); {n_rep} replicate(s)"
    lo, hi = g[METRIC_CI[0]].to_numpy(float), g[METRIC_CI[1]].to_numpy(float)
    if ((g["_pairing"] == "").to_numpy() & ~(np.isfinite(lo) & np.isfinite(hi) & (hi > lo))).any():
        return "none: no interval for at least one run (point estimates only)"
    source = "patients (per-sample predictions)" if (g["_pairing"] != "").all() else "per-run intervals"
    return f"{source} + {n_rep} replicate(s)" + ("" if n_rep > 1 else " (test sampling only)")
