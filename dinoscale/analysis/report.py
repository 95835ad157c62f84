"""The report: PNG plots, fitted parameters (CSV), a markdown summary and a self-contained HTML page.

Provenance of data and weights comes first, always. Then the answer a user came for: per (modality,
dataset) the best configuration and the cheapest one whose 95% interval overlaps it, with the cost
frontier; a heatmap of the headline [95% CI] over model size x resolution per probe / strategy
(``[<modality>_<dataset>_]heatmap.png``) and the headline against GFLOPs per image with its frontier
(``frontier.png``); then one short verdict block per (dataset, probe, strategy), quiet axes folded
into one sentence; then the detail: method, the curves ``[<modality>_]<stem>_vs_<axis>.png``
(``sources.file_stem``: ``auroc``, ``dice``, ``voi``...), fits and cells. ``verdicts.md`` is the
answer and the verdicts alone (what a sweep prints at its end)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.analysis.compare import (
    best_configurations,
    cheapest_as_good,
    compare_families,
    compare_strategies,
    compute_cost,
    family_verdict,
    pareto_frontier,
    selection_column,
    summarize_families,
    summarize_strategies,
)
from dinoscale.analysis.curves import AXES, EXTRA_AXES, GROUP_KEYS, Curve, axes_words, build_curves, fits_table
from dinoscale.analysis.external import external_lines, external_markdown, external_table
from dinoscale.analysis.html import render_html
from dinoscale.analysis.labels import AXIS as LABEL_AXIS
from dinoscale.analysis.labels import label_curves, label_lines
from dinoscale.analysis.plots import plot_axis, plot_frontier, plot_heatmap, plot_strategies
from dinoscale.analysis.resample import CellDraws, bootstrap_cells
from dinoscale.analysis.scaling import MIN_POINTS, MIN_POINTS_BROKEN, MIN_POINTS_EXTRAPOLATION
from dinoscale.analysis.sources import (
    KNOWN_HEADLINES,
    NO_INTERVALS,
    detect_headline,
    direction,
    file_stem,
    headline_sentence,
    provenance_gaps,
    short_name,
    table_provenance,
    tidy_results,
)
from dinoscale.headline import AUROC, Headline
from dinoscale.provenance import DEMO_HEADLINE, Provenance
from dinoscale.record import CELL_KEYS

MODALITY, DATASET = record.CONTEXT_COLUMNS

RESAMPLES = 500


@dataclass
class ReportContent:
    """What both the markdown and the HTML say, in order: the answer first, then the pictures that
    support it, then short verdicts, then the detail."""

    title: str
    provenance: list[str]
    method: list[str]
    figures: list[tuple[str, Path]]  # detail plots: (caption, file in the report folder)
    verdicts: dict[str, list[tuple[str, list[str]]]]  # modality -> [(block title, lines)] per dataset/probe/strategy
    best: list[tuple[int, str]]  # the answer (level, text): per (modality, dataset) the best, then under it the
    # cheapest as good and the cost frontier
    strategies: list[str]
    cells: pd.DataFrame
    fits: pd.DataFrame
    comparisons: pd.DataFrame
    files: list[str] = field(default_factory=list)
    headline: Headline = AUROC
    demo: bool = False  # phantom / semi-synthetic data, random weights or the demo profile (dinoscale.provenance)
    banner: str = DEMO_HEADLINE  # the line above a demo's provenance (a rehearsal's says REHEARSAL)
    key_figures: list[tuple[str, Path]] = field(default_factory=list)  # heatmaps and cost frontiers
    notes: list[str] = field(default_factory=list)  # what the analysis left out or assumed, and why
    families: list[str] = field(default_factory=list)  # encoder families compared (compare.summarize_families)
    family_comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)
    external: pd.DataFrame = field(default_factory=pd.DataFrame)  # per cell and external set (analysis.external)


def _method(cd: CellDraws) -> list[str]:
    sources = ", ".join(sorted(set(cd.cells["uncertainty"])))
    h = cd.headline
    error = (
        f"Error E = 1 - {h.label}"
        if h.goal == "max"
        else f"Error E = {h.test} itself ({direction(h)}: it is already an error, so it is fitted untransformed, no sign flip)"
    )
    return [
        headline_sentence(h),
        f"{error}, fitted per (modality, dataset, probe, strategy) as a saturating power law "
        "E = floor + A * x^(-alpha) (robust soft-L1 loss, several starts); alpha > 0 means larger x is better.",
        f"No exponent below {MIN_POINTS} distinct x values: the verdict then says 'too few points to fit'. A one-break "
        f"broken power law is fitted from {MIN_POINTS_BROKEN} points; a leave-largest-out extrapolation check from "
        f"{MIN_POINTS_EXTRAPOLATION}.",
        f"Verdicts compare the points themselves through paired bootstrap draws ({len(cd.draws)} resamples; "
        f"uncertainty from {sources}); 'no reliable trend' means the 95% intervals of the differences include zero.",
        f"Where a point has no interval (none given, or zero-width), its curve is described by the points alone "
        f"(better / worse at larger x, best inside the range), with no exponent, and labelled '{NO_INTERVALS}'.",
    ]


def _res(v) -> str:
    return "resolution not stated" if pd.isna(v) else f"{float(v):g}px"


def _selection_warnings(runs: pd.DataFrame) -> list[str]:
    """Runs whose choice on val sits on the edge of its grid (tag ``record.SELECTION_EDGE``): the optimum may
    lie outside the grid, so the number may understate the configuration."""
    if "selection_edge" not in runs.columns:
        return []
    edged = runs[runs["selection_edge"].fillna("").astype(str) != ""]
    if edged.empty:
        return []
    examples = "; ".join(
        f"{r.backbone} {_res(r.resolution)} {r.probe}: {r.selection_edge}" for r in edged.head(5).itertuples()
    )
    return [
        f"Warning: {len(edged)} of {len(runs)} run(s) chose a hyper-parameter on the edge of its grid, so the "
        f"optimum may lie outside it (widen the grid): {examples}" + (" ..." if len(edged) > 5 else "")
    ]


def _exponent_words(c: Curve, h: Headline = AUROC) -> str:
    f = c.fit
    return f"alpha={f.alpha:.2f} [{f.alpha_low:.2f}, {f.alpha_high:.2f}]" if f.exponent_identified else ""


def _curve_words(c: Curve) -> str:
    """The verdict in a few words; too few points for an exponent is said once, briefly."""
    f = c.fit
    if f.verdict.startswith("too few points"):
        return f"{f.verdict.split('the points alone: ')[-1]} ({f.n_points} points: too few for an exponent)"
    return f.verdict


def _extras(c: Curve, h: Headline) -> str:
    """What a verdict line adds about one curve: an identified exponent, a supported break, and a law that
    fails to extrapolate (floors, bands and consistent checks are in fits.csv and the plots)."""
    f, parts = c.fit, []
    if _exponent_words(c, h):
        parts.append(_exponent_words(c, h))
    if f.broken is not None and f.broken.delta_aicc > 2:
        parts.append(
            f"a break at {c.axis}={f.broken.break_x:.3g} fits better (alpha {f.broken.alpha_before:.2f} "
            f"then {f.broken.alpha_after:.2f})"
        )
    if f.extrapolation is not None and not f.extrapolation.consistent:
        parts.append(f"leave-largest-out: {f.extrapolation.describe(c.axis)}")
    return "; ".join(parts)


def _where_words(ats: list[str], every: bool) -> str:
    """``resolution=64``, ``resolution=96`` -> 'at resolution 64, 96' (or 'at every resolution')."""
    if ats == ["all backbones x resolutions"]:
        return "across all cells"
    key = ats[0].split("=", 1)[0]
    if every and len(ats) > 1:
        return f"at every {key}"
    values = [a.split("=", 1)[-1] for a in ats]
    return f"{'for' if key == 'backbone' else 'at'} {key} {', '.join(values)}"


def _block_lines(curves: list[Curve], h: Headline) -> list[str]:
    """One line per distinct verdict of each axis that has more than one value; every 'no reliable
    trend' folded into one closing sentence."""
    lines, quiet = [], []
    for axis in AXES:
        mine = [c for c in curves if c.axis == axis]
        shown = [c for c in mine if c.fit.n_points >= 2]  # an axis with a single value says nothing
        if not shown:
            continue
        by_words: dict[str, list[Curve]] = {}
        for c in shown:
            by_words.setdefault(_curve_words(c), []).append(c)
        for words, cs in by_words.items():
            where = _where_words([c.at for c in cs], every=len(cs) == len(mine))
            if cs[0].fit.trend == "no_trend":
                quiet.append(f"vs {AXIS_WORDS[axis]} {where}")
                continue
            label = f" ({NO_INTERVALS})" if words.endswith(f" ({NO_INTERVALS})") else ""
            words = words.removesuffix(label)
            for said in (f"with {axis}", f"larger {axis}"):
                words = words.replace(said, said.replace(axis, AXIS_WORDS[axis]), 1)
            line = f"{words} {where}{label}".replace("gflops=", "GFLOPs=")
            extras = [(c.at.split("=", 1)[-1], _extras(c, h)) for c in cs if _extras(c, h)]
            if len(cs) == 1 and extras:
                line += f" ({extras[0][1]})"
            elif extras:
                line += " (" + "; ".join(f"{at}: {e}" for at, e in extras) + ")"
            lines.append(line)
    if quiet:
        lines.append("No reliable trend (95% intervals of the differences include zero): " + "; ".join(quiet) + ".")
    return lines


AXIS_WORDS = {"params": "model size", "resolution": "resolution", "gflops": "compute (GFLOPs)"}


def _blocks(curves: list[Curve], cells: pd.DataFrame, h: Headline) -> dict[str, list[tuple[str, list[str]]]]:
    out: dict[str, list[tuple[str, list[str]]]] = {}
    keys = [k for k in GROUP_KEYS if k != MODALITY]
    for gkey, g in cells.groupby(GROUP_KEYS, sort=True):
        group = dict(zip(GROUP_KEYS, gkey))
        mine = [c for c in curves if c.group == group]
        by = selection_column(g)  # one selection rule everywhere: val where every cell logged it
        best = g.loc[g[by].idxmax() if h.goal == "max" else g[by].idxmin()]
        title = " · ".join(
            f"{group[k]} probe" if k == "probe" else f"{k}: {group[k]}" if k in EXTRA_AXES else str(group[k])
            for k in keys
            if not (k == DATASET and group[k] == "unknown") and group[k] != record.AXIS_DEFAULTS.get(k)
        )
        title += (
            f" ({len(g)} cell{'s' if len(g) != 1 else ''}; top {short_name(h)} {_value(best, h)} at {_config(best)}"
            f"{_val_words(best) if by == 'val_metric' else ', ranked on test'})"
        )
        lines = _block_lines(mine, h) or ["a single configuration: nothing to compare"]
        out.setdefault(str(group[MODALITY]), []).append((title, lines))
    return out


def _value(r, h: Headline = AUROC) -> str:
    if np.isfinite(r.low) and np.isfinite(r.high):
        return f"{r.metric:.3f} [{r.low:.3f}, {r.high:.3f}]"
    return f"{r.metric:.3f} ({NO_INTERVALS})"


def _val_words(r, lead: str = ", chosen on validation: val") -> str:
    """``, chosen on validation: val 0.812 (n=24)``: the value the selection saw, and on how many val units ('' unknown)."""
    if "val_metric" not in r.index or not np.isfinite(r.val_metric):
        return ""
    n = f" (n={int(r.n_val)})" if "n_val" in r.index and np.isfinite(r.n_val) else ""
    ci = f" [{r.val_low:.3f}, {r.val_high:.3f}]" if _has_val_interval(r) else ""
    return f"{lead} {r.val_metric:.3f}{ci}{n}"


def _has_val_interval(r) -> bool:
    return "val_low" in r.index and np.isfinite(r.val_low) and np.isfinite(r.val_high)


def _val_tie_line(cd: CellDraws, b, h: Headline) -> list[tuple[int, str]]:
    """When the runner-up on validation has a val interval that overlaps the best's, the data cannot tell them
    apart: said instead of letting 'best' stand alone."""
    g = cd.cells[(cd.cells.modality == b.modality) & (cd.cells.dataset == b.dataset)]
    if b.chosen_on != "validation" or len(g) < 2:
        return []
    ranked = g.sort_values("val_metric", ascending=h.goal != "max")
    first, second = ranked.iloc[0], ranked.iloc[1]
    if not (_has_val_interval(first) and _has_val_interval(second)):
        return []
    if first.val_low > second.val_high or second.val_low > first.val_high:
        return []
    return [
        (
            1,
            f"validation cannot tell it from {_describe(second, h)} (val {second.val_metric:.3f} "
            f"[{second.val_low:.3f}, {second.val_high:.3f}]): their val intervals overlap, so 'best' is the "
            "higher point estimate among configurations the data does not separate",
        )
    ]


def _config(r) -> str:
    res = "resolution not stated" if pd.isna(r.resolution) else f"{r.resolution:g}px"
    return f"{r.backbone}@{res}"


def _probe_words(r) -> str:
    return f" {r.probe}/{r.strategy}{axes_words(r)}"


def _size(n_params: float) -> str:
    return f"{n_params / 1e6:.2f}M params" if np.isfinite(n_params) else "size not stated"


def _describe(r, h: Headline) -> str:
    res = "resolution not stated" if pd.isna(r.resolution) else f"{r.resolution:g}px"
    return f"{r.backbone} ({_size(r.n_params)}) at {res}, {r.probe} probe, {r.strategy}{axes_words(r)}"


def _cost_words(cost: float) -> str:
    return f"{cost:.3g} GFLOPs per image" if np.isfinite(cost) else "compute not stated"


def _label_method(curves: list[Curve]) -> list[str]:
    if not any(c.axis == LABEL_AXIS for c in curves):
        return []
    return [
        "Label efficiency: per backbone x resolution, the headline against the training patients of each "
        "training-set size (averaged over the replicates); every replicate draws its own nested, stratified subsets "
        "by patient, so an interval pooling the replicates carries the subset draw. The same saturating law is "
        "fitted on the error; the answer names the smallest size whose interval overlaps full data's (or the "
        "largest size's)."
    ]


def _answer(cd: CellDraws, best: pd.DataFrame, h: Headline) -> list[tuple[int, str]]:
    """Per (modality, dataset): the best configuration, the cheapest whose interval overlaps it, and the
    cost frontier."""
    lines = []
    several = cd.cells.groupby(MODALITY)[DATASET].nunique().to_dict()
    for b in best.itertuples():
        where = b.modality if several.get(b.modality, 1) == 1 else f"{b.modality} / {b.dataset}"
        r = cd.cells.loc[b.cell]
        cost, cost_name = compute_cost(cd.cells)
        lines.append(
            (
                0,
                f"{where}: {_describe(r, h)}: {h.label} {_value(r, h)}"
                + (_val_words(r) if b.chosen_on == "validation" else f", chosen on {b.chosen_on}")
                + f"; {_cost_words(cost[b.cell])}",
            )
        )
        lines += _val_tie_line(cd, b, h)
        lines += _test_leader_lines(cd, b, h)
        cheap = cheapest_as_good(cd, pd.Series(b._asdict()))
        if cheap is None:
            lines.append((1, f"cheapest as good: cannot tell ({NO_INTERVALS})"))
        elif cheap["cell"] == b.cell:
            lines.append((1, "cheapest as good: the best itself - no cheaper configuration's 95% interval overlaps it"))
        else:
            c = cheap["row"]
            ratio = ""
            if np.isfinite(cheap["best_cost"]) and np.isfinite(cheap["cost"] or np.nan) and cheap["cost"] > 0:
                ratio = f", {cheap['best_cost'] / cheap['cost']:.1f}x less compute"
            lines.append(
                (
                    1,
                    f"cheapest as good: {_describe(c, h)}: {_value(c, h)}{_val_words(c, ', val')}, "
                    f"{_cost_words(cost[cheap['cell']])}{ratio} "
                    f"(its 95% interval overlaps the best's; ranked by {cheap['ranked_by']})",
                )
            )
        g = cd.cells[(cd.cells.modality == b.modality) & (cd.cells.dataset == b.dataset)]
        by = selection_column(g)
        front = pareto_frontier(g, cost[g.index], h.goal, by)
        if len(front) > 1:
            several = g[list(record.GROUP_AXES)].drop_duplicates().shape[0] > 1
            on_val = by == "val_metric"
            steps = " -> ".join(
                f"{_config(g.loc[i])}{_probe_words(g.loc[i]) if several else ''} "
                + (f"val {g.loc[i, 'val_metric']:.3f} / test " if on_val else "")
                + f"{g.loc[i, 'metric']:.3f} ({cost[i]:.3g})"
                for i in front
            )
            rule = "beats every cheaper configuration on val" if on_val else "beats every cheaper configuration"
            lines.append((1, f"cost frontier ({cost_name}; each step {rule}): {steps}"))
    return lines


def _test_leader_lines(cd: CellDraws, b, h: Headline) -> list[tuple[int, str]]:
    """Where the cell chosen on val is not the one with the best test value: whether the data can tell the two
    apart (their 95% test intervals overlap or not), instead of two different cells each looking "best"."""
    if b.chosen_on != "validation":
        return []
    g = cd.cells[(cd.cells.modality == b.modality) & (cd.cells.dataset == b.dataset)]
    top = g.metric.idxmax() if h.goal == "max" else g.metric.idxmin()
    if top == b.cell:
        return []
    chosen, lead = cd.cells.loc[b.cell], cd.cells.loc[top]
    said = f"on test, {_describe(lead, h)} scores {_value(lead, h)}{_val_words(lead, ', val')}"
    if not all(np.isfinite([chosen.low, chosen.high, lead.low, lead.high])):
        return [(1, f"{said}; without intervals the data cannot tell it from the chosen one ({NO_INTERVALS})")]
    if lead.low <= chosen.high and chosen.low <= lead.high:
        return [(1, f"{said}: its 95% interval overlaps the chosen one's, so the data cannot tell them apart")]
    return [(1, f"{said}, better than the chosen one's whole 95% interval: validation ranked them otherwise")]


def _figures(
    curves: list[Curve], comparisons: pd.DataFrame, out_dir: Path, title: str, prov: str, h: Headline = AUROC
) -> list[tuple[str, Path]]:
    figures = []
    modalities = sorted({c.group[MODALITY] for c in curves})
    for modality in modalities:
        prefix = "" if len(modalities) == 1 else f"{modality}_"
        mine = [c for c in curves if c.group[MODALITY] == modality]
        for axis in (*AXES, LABEL_AXIS):
            p = plot_axis(
                mine, axis, out_dir / f"{prefix}{file_stem(h)}_vs_{axis}.png", f"{title} - {modality}", prov, h
            )
            if p is not None:
                figures.append((f"{modality}: {short_name(h)} vs {axis} ({direction(h)})", p))
    p = plot_strategies(comparisons, out_dir / "strategies.png", f"{title}: strategy differences", h)
    if p is not None:
        figures.append(("strategy differences (other - baseline)", p))
    return figures


def _key_figures(cd: CellDraws, best: pd.DataFrame, out_dir: Path, title: str, prov: str) -> list[tuple[str, Path]]:
    """Per (modality, dataset): the size x resolution heatmap and the cost frontier."""
    h, figures = cd.headline, []
    groups = list(cd.cells.groupby(list(record.CONTEXT_COLUMNS), sort=True))
    cost, cost_name = compute_cost(cd.cells)
    for (modality, dataset), g in groups:
        prefix = "" if len(groups) == 1 else f"{_slug(modality)}_{_slug(dataset)}_"
        where = f"{modality} / {dataset}"
        b = best[(best.modality == modality) & (best.dataset == dataset)]
        best_cell = b.cell.iloc[0] if len(b) else None
        cheap = cheapest_as_good(cd, b.iloc[0]) if len(b) else None
        p = plot_heatmap(
            g, out_dir / f"{prefix}heatmap.png", f"{title} - {where}", prov, h, best_cell, cheap and cheap["cell"]
        )
        if p is not None:
            figures.append((f"{where}: {short_name(h)} [95% CI] over model size x resolution ({direction(h)})", p))
        front = pareto_frontier(g, cost[g.index], h.goal, selection_column(g))
        p = plot_frontier(
            g, cost[g.index], front, out_dir / f"{prefix}frontier.png", f"{title} - {where}", prov, h, cost_name
        )
        if p is not None:
            figures.append((f"{where}: {short_name(h)} against compute ({cost_name}), with the cost frontier", p))
    return figures


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in str(text))


def _answer_markdown(rc: ReportContent) -> list[str]:
    md = ["## Answer", "", headline_sentence(rc.headline), ""]
    md += [f"{'  ' * level}- {text}" for level, text in rc.best] + [""]
    if rc.notes:
        md += ["### About these results", ""] + [f"- {n}" for n in rc.notes] + [""]
    return md


def _markdown(rc: ReportContent) -> str:
    md = [f"# Scaling report: {rc.title}", ""]
    md += [f"> **{line}**" for line in ([rc.banner] if rc.demo else []) + rc.provenance] + [""]
    md += _answer_markdown(rc)
    md += [f"![{cap}]({p.name})\n" for cap, p in rc.key_figures]
    md += _verdict_blocks_markdown(rc)
    md += external_markdown(rc.external)
    md += ["## Method", ""] + rc.method + [""]
    md += [f"![{cap}]({p.name})\n" for cap, p in rc.figures]
    md += ["", "## Results", "", _cells_markdown(rc.cells, rc.headline)]
    md += ["", f"Files: {', '.join(rc.files)}."]
    return "\n".join(md) + "\n"


def _verdict_blocks_markdown(rc: ReportContent) -> list[str]:
    md = ["## Verdicts", ""]
    for modality, blocks in rc.verdicts.items():
        if len(rc.verdicts) > 1:
            md += [f"### {modality}", ""]
        for title, lines in blocks:
            md += [f"**{title}**", ""] + [f"- {v}" for v in lines] + [""]
    if rc.strategies:  # one strategy: nothing to compare, no section
        md += ["## Strategies", ""] + [f"- {s}" for s in rc.strategies]
    if rc.families:  # one family: nothing to compare, no section
        md += ["", "## Encoder families", ""] + [
            f"  - {s.strip()}" if s.startswith("  ") else f"- {s}" for s in rc.families
        ]
    return md + [""]


def _verdicts_markdown(rc: ReportContent) -> str:
    """The short version (verdicts.md, printed at the end of a sweep): the answer, then the verdicts."""
    return "\n".join(_answer_markdown(rc) + _verdict_blocks_markdown(rc)).rstrip() + "\n"


def _cells_markdown(cells: pd.DataFrame, h: Headline = AUROC) -> str:
    # an optional axis (train_size) gets a column where the sweep states it, and the patients each cell trained on
    extra = [a for a in record.AXIS_DEFAULTS if a in cells and (cells[a] != record.AXIS_DEFAULTS[a]).any()]
    n_train = record.N_TRAIN_PATIENTS if extra and record.N_TRAIN_PATIENTS in cells else None
    heads = extra + ([n_train] if n_train else [])
    table = [
        f"| modality | dataset | probe | strategy | {''.join(f'{a} | ' for a in heads)}backbone | params | resolution | "
        f"{h.label} [95% CI] | seeds |",
        f"|---|---|---|---|{'---|' * len(extra)}{'---:|' if n_train else ''}---|---:|---:|---|---:|",
    ]
    for r in cells.sort_values([*CELL_KEYS[:-3], "resolution", "n_params"]).itertuples():
        res = "not stated" if pd.isna(r.resolution) else f"{r.resolution:g}"
        params = f"{r.n_params / 1e6:.2f}M" if np.isfinite(r.n_params) else "not stated"
        row = dict(r._asdict())
        cols = "".join(f"{row[a]} | " for a in extra)
        if n_train:
            cols += "not stated | " if pd.isna(row[n_train]) else f"{row[n_train]:.0f} | "
        table.append(
            f"| {r.modality} | {r.dataset} | {r.probe} | {r.strategy} | {cols}{r.backbone} | {params} | "
            f"{res} | {_value(r, h)} | {r.seeds} |"
        )
    return "\n".join(table)


def write_report(
    df: pd.DataFrame,
    out_dir: Path | str,
    title: str | None = None,
    provenance: Provenance | list[str] | None = None,
    predictions: dict[str, pd.DataFrame] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    headline: Headline | None = None,
) -> Path:
    """Analyse a results table (one row per run) and write the report folder; returns it.

    ``provenance``: the sweep's ``Provenance`` (it decides whether the report is labelled DEMO), or
    lines about a results table (then the table's own ``weights`` column decides: random is a demo);
    by default the table's own (``df.attrs['provenance']``, as ``analysis.sweep_results`` sets it).
    ``title``: by default ``df.attrs['title']``, else the folder's name.

    ``predictions``: run_id -> per-sample test predictions, for patient-level paired resampling.
    ``headline``: the metric the table holds (default: ``df.attrs['headline']`` as set by
    ``results_from_mlflow`` / ``results_from_csv``, else detected from the columns).
    Any table the analysis can read gives a report (``sources.tidy_results`` says what it left out);
    one it cannot is a ValueError with one message.
    """
    out_dir = Path(out_dir)
    if df.empty:
        raise ValueError("no finished cells to analyse")
    title = title or df.attrs.get("title") or out_dir.name
    provenance = provenance if provenance is not None else df.attrs.get("provenance")
    headline = headline or df.attrs.get("headline") or detect_headline(df.columns)
    runs = tidy_results(df, headline)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir, headline)
    if isinstance(provenance, Provenance):
        decided, provenance = provenance, provenance.lines()
    else:  # lines about a results table: the table says what it holds, and Provenance decides on it
        decided = table_provenance(runs)
        provenance = list(provenance or []) + provenance_gaps(runs, list(provenance or []), decided)
    demo, banner = decided.demo, decided.headline or DEMO_HEADLINE
    cd = bootstrap_cells(
        runs.drop(columns=["_line"], errors="ignore"), predictions, resamples=resamples, seed=seed, headline=headline
    )
    curves, curve_notes = build_curves(cd, seed=seed)
    curves += label_curves(cd, seed=seed)  # the training-set-size axis, where the sweep has one
    comparisons = compare_strategies(cd)
    families = compare_families(cd)
    best = best_configurations(cd)
    external = external_table(runs)
    prov = " | ".join(provenance)
    rc = ReportContent(
        title=title,
        provenance=provenance,
        method=_method(cd) + _label_method(curves) + _selection_warnings(runs),
        figures=_figures(curves, comparisons, out_dir, title, prov, headline),
        verdicts=_blocks(curves, cd.cells, headline),
        best=_answer(cd, best, headline)
        + label_lines(curves, headline, cd.level)
        + external_lines(external, best, headline.label),
        strategies=summarize_strategies(comparisons, headline),
        cells=cd.cells.assign(headline=headline.test, goal=headline.goal),
        fits=fits_table(curves, headline),
        comparisons=comparisons,
        headline=headline,
        demo=demo,
        banner=banner,
        key_figures=_key_figures(cd, best, out_dir, title, prov),
        notes=list(runs.attrs.get("notes", [])) + curve_notes,
        families=family_verdict(cd) + summarize_families(families, headline),
        family_comparisons=families,
        external=external,
    )
    _write_files(rc, out_dir)
    return out_dir


def _plot_patterns(stems) -> tuple[str, ...]:
    return tuple(f"*{stem}_vs_{axis}.png" for stem in stems for axis in AXES)


# every headline's plots (an earlier report in the same folder may have been on another metric)
_OWN_OUTPUTS = _plot_patterns(sorted({file_stem(h) for h in KNOWN_HEADLINES})) + (
    "strategies.png",
    "strategies.csv",
    "*heatmap.png",
    "*frontier.png",
)


def _clear_previous(out_dir: Path, headline: Headline = AUROC) -> None:
    """Figures of an earlier report that this one does not redraw must not be attached as if current."""
    for pattern in _OWN_OUTPUTS + _plot_patterns([file_stem(headline)]):
        for f in out_dir.glob(pattern):
            f.unlink(missing_ok=True)


def _write_files(rc: ReportContent, out_dir: Path) -> None:
    rc.fits.to_csv(out_dir / "fits.csv", index=False)
    rc.cells.to_csv(out_dir / "results.csv", index=False)
    rc.files = ["fits.csv (fitted parameters)", "results.csv (cells with intervals)"]
    if not rc.comparisons.empty:
        rc.comparisons.to_csv(out_dir / "strategies.csv", index=False)
        rc.files.append("strategies.csv (strategy differences)")
    if not rc.family_comparisons.empty:
        rc.family_comparisons.to_csv(out_dir / "families.csv", index=False)
        rc.files.append("families.csv (paired differences between encoder families)")
    if not rc.external.empty:
        rc.external.to_csv(out_dir / "external.csv", index=False)
        rc.files.append("external.csv (internal and external test sets per cell, with the drop)")
    rc.files += ["report.html (self-contained)", "verdicts.md"]
    (out_dir / "verdicts.md").write_text(_verdicts_markdown(rc))
    (out_dir / "report.md").write_text(_markdown(rc))
    (out_dir / "report.html").write_text(render_html(rc), encoding="utf-8")
