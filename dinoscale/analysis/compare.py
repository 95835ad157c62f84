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
from dinoscale.headline import AUROC, Headline

STRATEGY_ORDER = ["frozen", "lora", "full"]  # cheapest first; unknown strategies follow, sorted
PAIR_KEYS = [k for k in record.CELL_KEYS if k != "strategy"]  # the cell position strategies are compared at


def best_configurations(cd: CellDraws) -> pd.DataFrame:
    """Per modality: chosen on validation where every cell logged it (reported on test), else on test;
    the highest value for a higher-is-better headline, the lowest for a lower-is-better one."""
    rows = []
    for modality, g in cd.cells.groupby("modality", sort=True):
        by_val = g["val_metric"].notna().all()
        score = g["val_metric"] if by_val else g["metric"]
        best = g.loc[score.idxmax() if cd.headline.goal == "max" else score.idxmin()]
        rows.append(
            {
                "modality": modality,
                "dataset": best.dataset,
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


def _strategy_rank(name: str) -> tuple[int, str]:
    return (STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else len(STRATEGY_ORDER), name)


def _paired(a: pd.Series, b: pd.Series) -> bool:
    return bool(a.pairing) and a.pairing == b.pairing and a.pairing.startswith("patients:") and "," not in a.pairing


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
            lo, hi = np.nanquantile(diff, [q, 1 - q])
            delta = b.metric - a.metric
            rows.append(
                {
                    **dict(zip(PAIR_KEYS, key)),
                    "baseline": a.strategy,
                    "other": b.strategy,
                    "delta": delta,
                    "delta_low": float(lo),
                    "delta_high": float(hi),
                    "paired": "paired over patients" if _paired(a, b) else "unpaired (independent draws)",
                    "verdict": _words(a.strategy, b.strategy, lo, hi, cd.headline.goal),
                }
            )
    return pd.DataFrame(rows)


def _words(base: str, other: str, lo: float, hi: float, goal: str = "max") -> str:
    higher, lower = ("better", "worse") if goal == "max" else ("worse", "better")
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
        better = int(g["verdict"].str.contains("better").sum())
        worse = int(g["verdict"].str.contains("worse").sum())
        lines.append(
            f"{mod}: {other} vs {base} over {len(g)} matched cell(s): better in {better}, worse in {worse}, "
            f"no reliable difference in {len(g) - better - worse}; median delta {g['delta'].median():+.3f}{units}"
        )
    return lines
