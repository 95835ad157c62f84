"""Best configuration per modality, and adaptation strategies compared cell by cell.

Strategies (frozen, lora, full, or whatever the strategy column holds) are compared at the same
(modality, dataset, probe, backbone, resolution). The difference's interval comes from the cells'
bootstrap draws: paired over patients when both cells were resampled on the same test set,
otherwise from independent draws (wider, and labelled as such). "Best" and "better" follow the
headline's goal: the lowest value wins for a lower-is-better headline (VOI), the highest otherwise.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.analysis.resample import CellDraws
from dinoscale.analysis.sources import NO_INTERVALS
from dinoscale.headline import AUROC, Headline

STRATEGY_ORDER = ["frozen", "lora", "full"]  # cheapest first; unknown strategies follow, sorted
PAIR_KEYS = [k for k in record.CELL_KEYS if k != "strategy"]  # the cell position strategies are compared at


def best_configurations(cd: CellDraws) -> pd.DataFrame:
    """Per (modality, dataset): chosen on validation where every cell logged it (reported on test), else on
    test; the highest value for a higher-is-better headline, the lowest for a lower-is-better one."""
    rows = []
    for (modality, dataset), g in cd.cells.groupby(list(record.CONTEXT_COLUMNS), sort=True):
        by_val = g["val_metric"].notna().all()
        score = g["val_metric"] if by_val else g["metric"]
        best = g.loc[score.idxmax() if cd.headline.goal == "max" else score.idxmin()]
        rows.append(
            {
                record.MODALITY_PARAM: modality,
                record.DATASET_PARAM: dataset,
                "cell": best.name,
                "backbone": best.backbone,
                "n_params": best.n_params,
                "resolution": best.resolution,
                "probe": best.probe,
                "strategy": best.strategy,
                "test_metric": best.metric,
                "test_low": best.low,
                "test_high": best.high,
                "chosen_on": "validation" if by_val else "test (optimistic: no validation metric in the results)",
            }
        )
    return pd.DataFrame(rows)


def compute_cost(cells: pd.DataFrame) -> tuple[pd.Series, str]:
    """What a cell costs per image: forward GFLOPs (logged, else 2 x params x tokens), and its name."""
    from dinoscale.analysis.curves import gflops_column

    gflops, _ = gflops_column(cells)
    return gflops, "forward GFLOPs per image"


def cheapest_as_good(cd: CellDraws, best: pd.Series) -> dict | None:
    """The cheapest cell of the best's (modality, dataset) whose interval overlaps the best's interval.

    Cheapest by forward GFLOPs per image where known, else by (parameters, resolution). None when the
    best has no interval (nothing can be said to be "as good" from point estimates)."""
    g = cd.cells[(cd.cells.modality == best.modality) & (cd.cells.dataset == best.dataset)].copy()
    if not (np.isfinite(best.test_low) and np.isfinite(best.test_high)):
        return None
    g["cost"], cost_name = compute_cost(g)
    overlap = g[(g.low <= best.test_high) & (g.high >= best.test_low)]
    by_cost = overlap[overlap.cost.notna()].sort_values(["cost", "n_params", "resolution"])
    if not by_cost.empty and np.isfinite(g.loc[best.cell, "cost"]):
        pick, how = by_cost.iloc[0], cost_name
    else:
        pick = overlap.sort_values(["n_params", "resolution"], na_position="last").iloc[0]
        how = "parameters, then resolution (no compute figures in the results)"
    return {
        "cell": pick.name,
        "row": pick,
        "cost": pick.get("cost"),
        "best_cost": g.loc[best.cell, "cost"],
        "ranked_by": how,
    }


def selection_column(cells: pd.DataFrame) -> str:
    """The column cells are ranked by: ``val_metric`` where every cell logged it (reported on test), else
    ``metric`` (test: optimistic), as ``best_configurations`` chooses."""
    return "val_metric" if "val_metric" in cells and cells["val_metric"].notna().all() else "metric"


def pareto_frontier(cells: pd.DataFrame, cost: pd.Series, goal: str = "max", by: str = "metric") -> list:
    """Indices of the cells no cheaper (or equally cheap) cell matches or beats on ``by``, cheapest first: at
    each cost the best cell, kept when it beats every cheaper one."""
    known = cost.dropna()
    frontier, best = [], None
    for _, idx in known.groupby(known, sort=True).groups.items():
        values = cells.loc[idx, by]
        i = values.idxmax() if goal == "max" else values.idxmin()
        m = values[i]
        if best is None or (m > best if goal == "max" else m < best):
            frontier.append(i)
            best = m
    return frontier


def _strategy_rank(name: str) -> tuple[int, str]:
    return (STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else len(STRATEGY_ORDER), name)


def _paired(a: pd.Series, b: pd.Series) -> bool:
    return bool(a.pairing) and a.pairing == b.pairing and a.pairing.startswith("patients:") and "," not in a.pairing


def _pairing_words(a: pd.Series, b: pd.Series, lo: float) -> str:
    """How a difference's interval was drawn: the same patient resamples for both cells, or not."""
    if _paired(a, b):
        return "paired over patients"
    return "no intervals" if np.isnan(lo) else "unpaired (independent draws)"


def compare_strategies(cd: CellDraws) -> pd.DataFrame:
    """One row per cell position and strategy pair: delta = metric(other) - metric(baseline), in the
    headline's units (so a better 'other' has delta > 0 for a higher-is-better headline, < 0 otherwise)."""
    rows = []
    q = (1 - cd.level) / 2
    for key, g in cd.cells.groupby(PAIR_KEYS, sort=True):
        if g["strategy"].nunique() < 2:
            continue
        ordered = sorted(g.index, key=lambda i: _strategy_rank(g.loc[i, "strategy"]))
        for i, j in combinations(ordered, 2):
            a, b = g.loc[i], g.loc[j]
            diff = cd.draws[:, j] - cd.draws[:, i]
            lo, hi = np.nanquantile(diff, [q, 1 - q]) if np.isfinite(diff).any() else (np.nan, np.nan)
            delta = b.metric - a.metric
            rows.append(
                {
                    **dict(zip(PAIR_KEYS, key)),
                    "baseline": a.strategy,
                    "other": b.strategy,
                    "delta": delta,
                    "delta_low": float(lo),
                    "delta_high": float(hi),
                    "paired": _pairing_words(a, b, lo),
                    "verdict": _words(a.strategy, b.strategy, lo, hi, cd.headline.goal, delta),
                }
            )
    return pd.DataFrame(rows)


def _words(base: str, other: str, lo: float, hi: float, goal: str = "max", delta: float = 0.0) -> str:
    higher, lower = ("better", "worse") if goal == "max" else ("worse", "better")
    if np.isnan(lo) or np.isnan(hi):  # no interval on one side: the points alone, and said so
        side = higher if delta > 0 else lower if delta < 0 else None
        said = (
            f"{other} {'higher' if delta > 0 else 'lower'} than {base} ({side} by point estimate)"
            if side
            else f"{other} equal to {base}"
        )
        return f"{said} ({NO_INTERVALS})"
    if lo > 0:
        return f"{other} {higher} than {base}"
    if hi < 0:
        return f"{other} {lower} than {base}"
    return f"no reliable difference between {other} and {base}"


def summarize_strategies(comparisons: pd.DataFrame, headline: Headline = AUROC) -> list[str]:
    if comparisons.empty:
        return []
    units = f" in {headline.test} ({'higher' if headline.goal == 'max' else 'lower'} is better)"
    lines = []
    for (mod, base, other), g in comparisons.groupby(["modality", "baseline", "other"], sort=True):
        reliable = ~g["verdict"].str.contains(NO_INTERVALS, regex=False)
        if not reliable.all():
            lines.append(
                f"{mod}: {other} vs {base} over {int((~reliable).sum())} matched cell(s) without intervals: median "
                f"delta {g.loc[~reliable, 'delta'].median():+.3f}{units} ({NO_INTERVALS})"
            )
            g = g[reliable]
            if g.empty:
                continue
        better = int(g["verdict"].str.contains("better").sum())
        worse = int(g["verdict"].str.contains("worse").sum())
        lines.append(
            f"{mod}: {other} vs {base} over {len(g)} matched cell(s): better in {better}, worse in {worse}, "
            f"no reliable difference in {len(g) - better - worse}; median delta {g['delta'].median():+.3f}{units}"
        )
    return lines


# ---------------------------------------------------------------- encoder families compared


FAMILY = record.FAMILY_PARAM
FAMILY_POSITION = [k for k in record.CELL_KEYS if k not in ("backbone", "n_params")]  # where families meet


def _family_rank(name: str) -> tuple[int, str]:
    """DINOv3 first (the family the comparison is about), then the others by name."""
    return (0 if name.startswith("dinov3") else 1, name)


def _best_of(g: pd.DataFrame, by: str, goal: str):
    return g.loc[g[by].idxmax() if goal == "max" else g[by].idxmin()]


def compare_families(cd: CellDraws) -> pd.DataFrame:
    """Each family's best cell at every (modality, dataset, probe, strategy, resolution), chosen on validation
    where every cell logged it (else on test), and every pair of families there: delta = metric(first) -
    metric(second), DINOv3 first, with the interval of the difference of the two cells' bootstrap draws (paired
    over patients where both were resampled on the same test patients)."""
    from dinoscale.analysis.curves import family_column

    cells = cd.cells.copy()
    cells[FAMILY] = family_column(cells)
    by = selection_column(cells)
    q = (1 - cd.level) / 2
    rows = []
    for key, g in cells.groupby(FAMILY_POSITION, sort=True, dropna=False):
        families = sorted(g[FAMILY].unique(), key=_family_rank)
        if len(families) < 2:
            continue
        best = {f: _best_of(g[g[FAMILY] == f], by, cd.headline.goal) for f in families}
        for fa, fb in combinations(families, 2):
            a, b = best[fa], best[fb]
            diff = cd.draws[:, cells.index.get_loc(a.name)] - cd.draws[:, cells.index.get_loc(b.name)]
            lo, hi = np.nanquantile(diff, [q, 1 - q]) if np.isfinite(diff).any() else (np.nan, np.nan)
            delta = a.metric - b.metric
            rows.append(
                {
                    **dict(zip(FAMILY_POSITION, key)),
                    "family": fa,
                    "backbone": a.backbone,
                    "other_family": fb,
                    "other_backbone": b.backbone,
                    "delta": delta,
                    "delta_low": float(lo),
                    "delta_high": float(hi),
                    "paired": _pairing_words(a, b, lo),
                    "verdict": _words(b.backbone, a.backbone, lo, hi, cd.headline.goal, delta),
                }
            )
    return pd.DataFrame(rows)


def family_difference_words(r) -> str:
    """'dinov3-vitb16 - rad-dino: +0.012 [-0.004, 0.027] (paired over patients)'."""
    interval = "" if np.isnan(r.delta_low) else f" [{r.delta_low:+.3f}, {r.delta_high:+.3f}]"
    return f"{r.backbone} − {r.other_backbone}: {r.delta:+.3f}{interval} ({r.paired})"


def summarize_families(comparisons: pd.DataFrame, headline: Headline = AUROC) -> list[str]:
    """One line per family pair and resolution, grouped by modality, dataset, probe and strategy."""
    if comparisons.empty:
        return []
    units = f"{headline.test}, {'higher' if headline.goal == 'max' else 'lower'} is better"
    lines = []
    for (mod, ds, probe, strategy), g in comparisons.groupby(["modality", "dataset", "probe", "strategy"], sort=True):
        lines.append(f"{mod} {ds} · {probe} probe · {strategy} (each family's best cell per resolution; {units}):")
        for _, r in g.sort_values(["family", "other_family", "resolution"]).iterrows():
            lines.append(
                f"  {r.family} vs {r.other_family} at resolution {r.resolution:g}: {family_difference_words(r)} - "
                f"{r.verdict}"
            )
    return lines


def family_verdict(cd: CellDraws) -> list[str]:
    """Which family wins per (modality, dataset), and whether DINOv3's best cell beats the best cell of every
    other family, with the interval of the difference (both chosen as ``best_configurations`` chooses)."""
    from dinoscale.analysis.curves import family_column

    cells = cd.cells.copy()
    cells[FAMILY] = family_column(cells)
    by = selection_column(cells)
    q = (1 - cd.level) / 2
    lines = []
    for (mod, ds), g in cells.groupby(list(record.CONTEXT_COLUMNS), sort=True):
        if g[FAMILY].nunique() < 2:
            continue
        top = _best_of(g, by, cd.headline.goal)
        lines.append(f"{mod} {ds}: the best cell is {top.backbone} (family {top[FAMILY] or 'not stated'})")
        ours = g[g[FAMILY].str.startswith("dinov3")]
        others = g[~g[FAMILY].str.startswith("dinov3")]
        if ours.empty or others.empty:
            continue
        a, b = _best_of(ours, by, cd.headline.goal), _best_of(others, by, cd.headline.goal)
        diff = cd.draws[:, cells.index.get_loc(a.name)] - cd.draws[:, cells.index.get_loc(b.name)]
        lo, hi = np.nanquantile(diff, [q, 1 - q]) if np.isfinite(diff).any() else (np.nan, np.nan)
        r = pd.Series(
            {
                "backbone": f"{a.backbone}@{a.resolution:g}",
                "other_backbone": f"{b.backbone}@{b.resolution:g}",
                "delta": a.metric - b.metric,
                "delta_low": lo,
                "delta_high": hi,
                "paired": "paired over patients" if _paired(a, b) else "unpaired (independent draws)",
            }
        )
        words = _words(r.other_backbone, r.backbone, lo, hi, cd.headline.goal, r.delta)
        lines.append(f"{mod} {ds}: DINOv3's best vs the best other family: {family_difference_words(r)} - {words}")
    return lines


MATCHED_COMPUTE = 1.5  # two cells are at matched compute when their forward GFLOPs per image differ by <= 1.5x


def compare_families_at_compute(cd: CellDraws, tolerance: float = MATCHED_COMPUTE) -> pd.DataFrame:
    """Families compared at matched compute: each cell of the first family (DINOv3 first) against the cell of
    the other family nearest to it in forward GFLOPs per image (any resolution), kept where the two costs differ
    by at most ``tolerance`` x; the difference's interval as in ``compare_families``. Empty where no GFLOPs (or
    tokens per image to estimate them) are in the results."""
    from dinoscale.analysis.curves import family_column

    cells = cd.cells.copy()
    cells[FAMILY] = family_column(cells)
    cells["cost"], _ = compute_cost(cells)
    cells = cells[cells.cost.notna() & (cells.cost > 0)]
    q = (1 - cd.level) / 2
    keys = [k for k in FAMILY_POSITION if k != "resolution"]
    rows = []
    for key, g in cells.groupby(keys, sort=True, dropna=False):
        for fa, fb in combinations(sorted(g[FAMILY].unique(), key=_family_rank), 2):
            ga, gb = g[g[FAMILY] == fa], g[g[FAMILY] == fb]
            for i, a in ga.iterrows():
                j = (np.log(gb.cost) - np.log(a.cost)).abs().idxmin()
                b = gb.loc[j]
                ratio = max(a.cost, b.cost) / min(a.cost, b.cost)
                if ratio > tolerance:
                    continue
                diff = cd.draws[:, cd.cells.index.get_loc(i)] - cd.draws[:, cd.cells.index.get_loc(j)]
                lo, hi = np.nanquantile(diff, [q, 1 - q]) if np.isfinite(diff).any() else (np.nan, np.nan)
                delta = a.metric - b.metric
                rows.append(
                    {
                        **dict(zip(keys, key)),
                        "family": fa,
                        "backbone": f"{a.backbone}@{a.resolution:g}",
                        "gflops": a.cost,
                        "other_family": fb,
                        "other_backbone": f"{b.backbone}@{b.resolution:g}",
                        "other_gflops": b.cost,
                        "delta": delta,
                        "delta_low": float(lo),
                        "delta_high": float(hi),
                        "paired": _pairing_words(a, b, lo),
                        "verdict": _words(
                            f"{b.backbone}@{b.resolution:g}",
                            f"{a.backbone}@{a.resolution:g}",
                            lo,
                            hi,
                            cd.headline.goal,
                            delta,
                        ),
                    }
                )
    return pd.DataFrame(rows)
