"""The protocol table of a sweep: every constant that shapes its numbers, in one document.

A reader comparing a dinoscale result with a paper needs, line by line, what the paper states (or
leaves open): the split and how replicates redraw it, the backbones and their normalisation, the
token set and pooling, the CT window, each probe's grid, epochs or steps, loss, optimiser, init and
selection rule, the strategies, the search budget, and the metric conventions (``metrics.CONVENTIONS``).
``protocol_table`` writes it from the resolved plan as markdown and as data; the sweep attaches both to
its parent run (``record.PROTOCOL``, ``record.PROTOCOL_JSON``) and ``dinoscale protocol SPEC...`` prints
it (``sweeps/PROTOCOL.md`` is generated that way from the paper profiles).
"""

from __future__ import annotations

from typing import Any

from dinoscale import record
from dinoscale.data import dataset_replicates
from dinoscale.data.dataset import get_dataset
from dinoscale.data.external import EXTERNAL_SPLIT
from dinoscale.data.splits import TRAIN_SIZE_UNITS, describe_recipe, replicate_recipe, train_size_label
from dinoscale.data.volumes import PET_SUV_RANGE
from dinoscale.features.recipe import resolve_intensity
from dinoscale.metrics import CONVENTIONS
from dinoscale.probes import get_probe
from dinoscale.strategies.registry import TRAINING
from dinoscale.sweep.plan import Plan, volume_window
from dinoscale.tasks import get_task

_TOKENS = {
    "cls_mean_patch": "CLS token concatenated with the mean of the patch tokens (last block, registers excluded)",
    "cls": "CLS token of the last block",
    "mean_patch": "mean of the patch tokens of the last block (registers excluded)",
    "last4_cls": "CLS tokens of the last 4 blocks, concatenated (DINOv2 linear eval)",
    "last4_cls_mean_patch": "CLS of the last 4 blocks + mean patch token of the last block",
    "patch_grid": "patch-token grid of the last block, [D, H/p, W/p] (registers excluded)",
}
# the metric conventions that apply to each task's numbers (dinoscale.metrics.CONVENTIONS)
_CONVENTIONS_OF = {
    "multilabel": ("macro AUROC", "intervals"),
    "multiclass": ("macro AUROC", "intervals"),
    "video_frames": ("macro AUROC (frames)", "frame metrics", "intervals"),
    "mil": ("macro AUROC", "intervals"),
    "segmentation": (
        "intervals",
        "Dice",
        "aggregated Dice",
        "IoU",
        "HD95",
        "detection",
        "lesion detection",
        "FP / FN volume",
    ),
    "multilabel_segmentation": ("intervals", "multi-label masks"),
    "instance_segmentation": ("intervals", "VOI / ARAND"),
    "registration": ("intervals", "registration"),
}
_VIEWS = {
    "images": "one feature row per image",
    "volumes": "slice features pooled per volume as they stream past",
    "slices": "one feature row per slice, in volume order",
}


def plan_recipes(plan: Plan) -> list:
    """The distinct feature recipes of a plan's cells, in cell order (``dinoscale.features.recipe``)."""
    return list(dict.fromkeys(c.recipe for c in plan.cells if c.recipe is not None))


def recipes_data(plan: Plan) -> dict:
    """Recipe digest -> every field of the recipe: the parent run's ``record.FEATURE_RECIPES``."""
    return {r.digest: r.as_dict() for r in plan_recipes(plan)}


def recipe_summary(plan: Plan) -> dict:
    """The recipe of the sweep's feature sets, step by step: a step shared by every recipe once, one that
    varies (the encoder, the resolution) with its values."""
    recipes = plan_recipes(plan)
    steps: dict[str, list[str]] = {}
    for r in recipes:
        for k, v in r.describe().items():
            if k != "digest":
                steps.setdefault(k, [])
                if v not in steps[k]:
                    steps[k].append(v)
    out = {k: v[0] if len(v) == 1 else " / ".join(v) for k, v in steps.items()}
    out["recipes"] = (
        f"{len(recipes)} (one per backbone x resolution x view; every field and digest in "
        "protocol/feature_recipes.json of the sweep's run; each cell run tagged features.recipe)"
    )
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _intensity_words(plan: Plan) -> str:
    """The mapping of each view's feature sets and why (``dinoscale.features.recipe.resolve_intensity``)."""
    spec, out = plan.spec, {}
    for fs in plan.feature_sets:
        r = fs.recipe
        if r is None or fs.view in out:
            continue
        _, why = resolve_intensity(spec.dataset.intensity, fs.view, spec.modality, r.window, spec.dataset.percentiles)
        out[fs.view] = f"{r.describe()['intensity']} ({why})"
    return "; ".join(f"{view}: {words}" for view, words in out.items()) if len(out) > 1 else "".join(out.values())


def protocol_data(plan: Plan) -> dict:
    """The protocol constants of a planned sweep, as nested data (sections -> {constant: value})."""
    spec, ds = plan.spec, plan.dataset
    task_name = ds.task if ds is not None else (plan.cells[0].task if plan.cells else "")
    strategies = {"strategies": ", ".join(spec.strategies)}
    for s in spec.strategies:
        if s in TRAINING:  # any registered training strategy: its stated values and search space
            strategies[s] = _fmt(spec.finetuning.of(s).model_dump(mode="json"))
    return {
        "sweep": {
            "name": spec.name,
            record.MODALITY_PARAM: spec.modality,
            "profile": spec.profile,
            "spec digest": spec.digest(),
            "cells": str(len(plan.cells)),
        },
        "data and splits": _data_section(plan, task_name),
        "backbones": {
            bb.name: f"{bb.arch_id}; weights {bb.weights} ({bb.weights_kind}); {bb.n_params:,} params; patch "
            f"{bb.patch_size}; mean {_fmt(list(bb.mean))}, std {_fmt(list(bb.std))}; tokens per image "
            + ", ".join(f"{r}px: {bb.tokens_per_image(r)}" for r in spec.resolutions)
            for bb in {c.backbone.name: c.backbone for c in plan.cells}.values()
        },
        "features": _features_section(spec.features, spec.resolutions),
        "feature recipe": recipe_summary(plan),
        "probes": _probes_section(plan, task_name),
        "strategies": strategies,
        "search": {
            "trials per frozen cell": f"{spec.search.n_trials} ({'seeded TPE over the probe space' if spec.search.n_trials > 1 else 'the probe grid only'}), sampler seed {spec.search.seed}",
            "selection": "on val only; test is scored once, for the chosen configuration",
        },
        "metrics and intervals": _metrics_section(spec, task_name),
        **({"external test sets": _external_section(plan)} if spec.external else {}),
    }


def _external_section(plan: Plan) -> dict:
    """Each external test set: its dataset, the rows scored, the class mapping, and how it is scored."""
    out = {}
    for e in plan.spec.external or []:
        ext = plan.externals.get(e.label)
        where = f"{e.dataset.name}" + (f" ({e.dataset.subset})" if e.dataset.subset else "")
        if ext is None:
            out[e.label] = f"{where}, rows: {e.split}; not prepared (no data here): mapping checked when it is"
            continue
        units = ext.dataset.units(EXTERNAL_SPLIT)
        mapping = ", ".join(f"{a} -> {b}" for a, b in ext.mapping.items())
        dropped = f"; dropped: {', '.join(e.drop)}" if e.drop else ""
        dropped += f"; centres {', '.join(map(str, e.centers))} only" if e.centers is not None else ""
        out[e.label] = (
            f"{where}, rows: {e.split} ({len(units.sample_ids)} units, {len(set(units.patient_ids))} patients); "
            f"classes: {mapping}{dropped}; colour {ext.dataset.color}"
        )
    out["scoring"] = (
        "each frozen cell's probe (fitted on its train, chosen on val) scores the external rows with the same "
        "model; macro AUROC over the mapped internal classes with patients in both sets; internal test on the "
        "same classes; drop = internal - external, interval from independent patient resamples of both sets"
    )
    return out


def _train_size_words(spec) -> str:
    """The training-set-size axis (label efficiency) as the protocol states it."""
    ts = spec.train_size
    sizes = ", ".join(train_size_label(ts.unit, v) for v in ts.values)
    return (
        f"{ts.unit} ({TRAIN_SIZE_UNITS[ts.unit]}): {sizes}; each replicate draws its subsets from its own train "
        f"patients by patient, stratified by label (the classes positive in a patient's units), nested across sizes "
        f"(one order per replicate, seeded by (split seed {spec.dataset.split.seed}, replicate)); val and test fixed; "
        "the features are the whole split's (a size costs probe fits only); lora / full cells train on the same subsets"
    )


def _data_section(plan: Plan, task_name: str) -> dict:
    spec, ds = plan.spec, plan.dataset
    task = get_task(task_name) if task_name else None
    split = spec.dataset.split
    # without data, the folds the spec states (split.folds: none leaves them to the dataset, known only with data)
    folds = ds.folds if ds is not None else (split.folds or 0)
    dataset_policy = ds.replicates if ds is not None else dataset_replicates(spec.dataset.name)
    recipes = {
        str(seed): describe_recipe(replicate_recipe(seed, split.seed, dataset_policy, split.replicates, folds))
        for seed in spec.seeds
    }
    window = volume_window(spec.dataset)
    data = {
        record.DATASET_PARAM: spec.dataset.name + (f" ({spec.dataset.subset})" if spec.dataset.subset else ""),
        "data source": (ds.provenance.get(record.DATA_SOURCE, "?") if ds is not None else "not available when planned"),
        "task": task_name or "?",
        "headline": f"{task.headline.test} ({task.headline.label}; goal {task.headline.goal})" if task else "?",
        "split": _in_units(_split_words(spec), task),
        "replicates (seeds)": _in_units("; ".join(f"{k}: {v}" for k, v in recipes.items()), task),
        "replicate policy": f"spec: {split.replicates}; dataset: {dataset_policy}"
        + (f" ({ds.replicates_reason})" if ds is not None and ds.replicates_reason else "")
        + (f"; {folds} cross-validation folds" if folds else ""),
        **({"training-set size": _train_size_words(spec)} if spec.train_size is not None else {}),
        "CT window": f"{_fmt(spec.dataset.window)} = {_fmt(list(window))} HU, clipped to [0, 1]" if window else "none",
        "intensity mapping": _intensity_words(plan),
    }
    if ds is not None and ds.channels:
        data["extra channels"] = (
            f"{', '.join(ds.channels)} fused into the encoder's channels (PET SUV range {_fmt(list(PET_SUV_RANGE))})"
        )
    if ds is not None and ds.volume is not None:  # the channel map and the common grid of the volumes
        for k, v in ds.volume.describe().items():
            data[f"volume {k}"] = v
    return data


def _in_units(words: str, task) -> str:
    """Protocol words about patients said of the task's independent unit (a video for frames of videos)."""
    if task is None or task.unit == "patient":
        return words
    return words.replace("patients", f"{task.unit}s").replace("patient", task.unit)


def _split_words(spec) -> str:
    fixed = get_dataset(spec.dataset.name).split_rule
    if fixed:  # the protocol's own split: dataset.split is not read
        return f"{fixed} (fixed by the dataset's protocol; dataset.split not read)"
    split = spec.dataset.split
    return (
        f"patient-level; val {split.val_fraction:g}, test {split.test_fraction:g} of patients where "
        f"the dataset has no official list (official lists used: {split.official}); shuffle seed {split.seed}"
    )


def _features_section(f, resolutions: list[int]) -> dict:
    return {
        "resolutions": _fmt(resolutions) + " px (square; images / slices resized, anti-aliased)",
        "interpolation": f.interpolation,
        "token set": f"{f.tokens}: {_TOKENS.get(f.tokens, f.tokens)}",
        "volume pooling": f"{f.volume_pool} over slices (3D classification, vector probes)",
        "storage dtype": f.dtype,
        "extraction batch": str(f.batch_size),
    }


def _probes_section(plan: Plan, task_name: str) -> dict:
    spec, ds = plan.spec, plan.dataset
    volumetric = ds.volumetric if ds is not None else None
    probes = {}
    for p in spec.probes:
        d = get_probe(p.kind)
        entry = {"description": d.description}
        if volumetric is not None:
            entry["reads"] = f"{_VIEWS[d.view(volumetric)]}; tokens {d.tokens(spec.features.tokens)}"
        entry.update({k: _fmt(v) for k, v in p.model_dump(mode="json").items() if k != "kind"})
        if d.rules is not None:
            entry.update(d.rules(p, task_name))
        probes[p.label] = entry
    return probes


def _metrics_section(spec, task_name: str) -> dict:
    task = get_task(task_name) if task_name else None
    b = spec.metrics.bootstrap
    words = {
        "bootstrap": f"{b.resamples} patient resamples, {b.level:.0%} percentile interval, seed {b.seed}",
        **(
            {"macro class set": f">= {spec.metrics.macro_min_patients} positive and negative test patients per class"}
            if task is not None and not task.dense
            else {}
        ),
        "minimum units for an interval": f"{spec.metrics.min_interval_units} test patients",
    }
    return {
        **{k: _in_units(v, task) for k, v in words.items()},
        **{k: CONVENTIONS[k] for k in _CONVENTIONS_OF.get(task_name, tuple(CONVENTIONS))},
    }


def protocol_markdown(plan: Plan) -> str:
    """The protocol table as markdown: one table per section, every constant on its own line."""
    data = protocol_data(plan)
    s = data["sweep"]
    lines = [
        f"## Protocol: {s['name']} ({s[record.MODALITY_PARAM]}, {s['profile']} profile)",
        "",
        f"Spec digest {s['spec digest']}; {s['cells']} cells. Generated by dinoscale from the resolved spec.",
        "",
    ]

    def table(rows: dict) -> None:
        lines.extend(["| constant | value |", "|---|---|"])
        lines.extend(f"| {k} | {_cell(v)} |" for k, v in rows.items())
        lines.append("")

    for section in ("data and splits", "backbones", "features", "feature recipe"):
        lines += [f"### {section.capitalize()}", ""]
        table(data[section])
    for label, rows in data["probes"].items():
        lines += [f"### Probe: {label}", ""]
        table(rows)
    for section in ("strategies", "search", "metrics and intervals", "external test sets"):
        if section in data:
            lines += [f"### {section.capitalize()}", ""]
            table(data[section])
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")
