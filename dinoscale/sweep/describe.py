"""What a sweep was, in a few lines: the description of its parent run (``record.DESCRIPTION``, the
``mlflow.note.content`` tag the MLflow UI shows beside the run), so the runs table says which spec, which data,
how large a grid and, once the sweep has finished, its headline result and the cell chosen on val.

Set when the parent run is created (``parent_description(plan)``) and again at the end of the sweep with
its rows (``parent_description(plan, rows)``). Markdown, as the MLflow UI renders it.
"""

from __future__ import annotations

from dinoscale import record
from dinoscale.sweep.plan import Plan
from dinoscale.tasks import get_task


def parent_description(plan: Plan, rows: list[dict] | None = None) -> str:
    """The parent run's description: the spec (name, description, profile), the dataset, the grid and, given
    the sweep's rows (``runner._collect_rows``), the headline of the best cell chosen on val."""
    spec, prov = plan.spec, plan.provenance()
    label = f" - {prov.headline}" if prov.headline else ""
    lines = [f"**{spec.name}** ({spec.modality}, {spec.profile} profile){label}"]
    if spec.description.strip():
        lines += ["", spec.description.strip()]
    lines += ["", f"- dataset: {_dataset_words(plan)}", f"- grid: {_grid_words(plan)}"]
    if rows is not None:
        lines.append(f"- result: {result_words(rows, get_task(plan.dataset.task).headline if plan.dataset else None)}")
    return "\n".join(lines)


def _dataset_words(plan: Plan) -> str:
    ds, prov = plan.spec.dataset, plan.provenance()
    source = prov.source if prov.source != "unknown" else "real"
    where = f", root {ds.root}" if ds.root else ""
    return f"{ds.name} ({source}{where})"


def _grid_words(plan: Plan) -> str:
    spec = plan.spec
    axes = [
        (len(spec.backbones), "backbone", "backbones"),
        (len(spec.resolutions), "resolution", "resolutions"),
        (len(spec.probes), "probe", "probes"),
        (len(spec.strategies), "strategy", "strategies"),
        (len(spec.seeds), "seed", "seeds"),
    ]
    if spec.train_size is not None:
        axes.append((len(spec.train_size.values), "training-set size", "training-set sizes"))
    n = len(plan.cells)
    return " x ".join(f"{k} {one if k == 1 else many}" for k, one, many in axes) + f" = {n} cell{'' if n == 1 else 's'}"


def best_row(rows: list[dict], goal: str) -> dict | None:
    """The finished cell chosen on val (the sweep's ``best_*`` metrics come from the same choice)."""
    ok = [r for r in rows if r.get("state") == "FINISHED" and r.get("val_metric") is not None]
    if not ok:
        return None
    sign = 1 if goal == "max" else -1
    return max(ok, key=lambda r: sign * r["val_metric"])


def result_words(rows: list[dict], headline) -> str:
    """'test macro AUROC 0.812 [0.751, 0.866] for dinov3-s @ 224px, linear probe, frozen, seed 0 (chosen on
    val 0.801); 8/8 cells finished' - or why there is no result."""
    done = sum(r.get("state") == "FINISHED" for r in rows)
    tally = f"{done}/{len(rows)} cells finished"
    best = best_row(rows, headline.goal) if headline is not None else None
    if best is None:
        return f"none ({tally})"
    lo, hi = (best.get(k) for k in record.METRIC_CI)
    interval = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    where = (
        f"{best.get('backbone')} @ {best.get('resolution')}px, {best.get('probe')} probe, {best.get('strategy')}"
        f", seed {best.get('seed')}"
    )
    return (
        f"{headline.label} {best['metric']:.3f}{interval} for {where} (the best cell on val: "
        f"{headline.val} {best['val_metric']:.3f}); {tally}"
    )
