"""Rehearse a paper spec: its dataset's replica in the published layout, the spec scaled down, the normal sweep.

``dinoscale rehearse sweeps/xray.yaml`` answers "will this spec run on the cluster?" before a GPU is paid
for. It writes a small replica of the spec's dataset in its exact published layout (file names, folders,
CSV columns, split lists, dtypes and header fields: ``dinoscale.data.replicas``) under the sweep's storage,
points ``dataset.root`` at it and runs the paper spec through the ordinary sweep path
(``dinoscale.sweep.runner``): the same adapter, readers, windows, tokens, probes, strategies, metrics and
analysis. Only what makes it a CPU-sized run changes, each change recorded on every MLflow run
(``record.REHEARSAL_PREFIX`` tags, params on the parent):

- profile ``rehearsal``: labelled REHEARSAL in the banner, the MLflow tags and the reports
  (``dinoscale.provenance``), reports under ``reports/<spec name>-rehearsal``, its own MLflow experiment
  ``dinoscale-<spec name>-rehearsal``, so it is never mistaken for (or analysed with) a real result;
- backbone weights ``random``; model sizes mapped in order of size onto the demo ladder of the same
  DINOv3 architecture (``dinov3-demo-xs/s/m/l``; ViT-S/B/L -> xs/s/m), so the size axis keeps its values;
- resolutions mapped in order onto small multiples of the patch size (32, 48, 64, ...; as many values);
- training budgets cut (``CUTS``: probe epochs / steps / iterations, fine-tuning epochs and search
  budgets, Optuna trials, bootstrap resamples), a resampling grid (``dataset.grid``) halved until no axis
  exceeds ``GRID_MAX`` voxels, and the replicates to the first seed (``replicates=k`` keeps k: the replicate
  path, CV folds included, at k times the cost);
- resources: one CPU per trial and per extraction task (the paper's 4-8 CPUs per trial would never be
  scheduled on a laptop); GPU fractions stay as written (used only where the cluster has GPUs).

``lean`` keeps only the smallest and the largest backbone and resolution (at most 2 x 2 of the grid; the
test suite's rehearsals), recorded like every other change.

``variant`` writes a broken replica (``corrupt_file``, ``bad_label``, ``mask_shape``): the rehearsal then
shows the user error the real run would give (one message, exit 2) or, with ``on_bad_file='skip'``, the
skipped file recorded on the run.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dinoscale import record
from dinoscale.console import capture_third_party, console
from dinoscale.errors import UserError
from dinoscale.models import backbone_facts
from dinoscale.models.backbones import get_backbone
from dinoscale.probes.registry import probe_spec_class
from dinoscale.spec import expand_encoders, load_spec, parse_spec
from dinoscale.specfile import load_raw, provenance_tags
from dinoscale.strategies.registry import get_strategy, training_kinds

LADDER = ("dinov3-demo-xs", "dinov3-demo-s", "dinov3-demo-m", "dinov3-demo-l")
PATCH = 16  # the demo ladder's patch size
DOMAIN_LADDER = tuple(f"dinov2-demo-{k}" for k in ("xs", "s", "m", "l", "xl"))  # the other families, compared
BOTH_PATCHES = 112  # the least common multiple of 16 and 14 (the two ladders' patch sizes): 112, 224, ... px
MAX_SEEDS = 1  # replicates kept by default (``replicates`` asks for more: CV folds, resplit draws)
# probe / strategy field -> the most a rehearsal runs of it
CUTS = {"epochs": 3, "steps": 12, "max_iter": 100}
FINETUNE_CUTS = {"epochs": 1, "budget": 2, "patience": 1}
SEARCH_TRIALS = 1
BOOTSTRAP_RESAMPLES = 100
GRID_MAX = 64  # a resampling grid (dataset.grid) halved until its largest axis is at most this (the replicas are small)


class RehearsalError(UserError):
    """A spec that cannot be rehearsed (its dataset has no replica writer, a generated dataset, a variant
    the replica cannot write)."""

    kind = "rehearsal"


@dataclass
class Rehearsal:
    """A paper spec transformed for a rehearsal: the spec to run, its replica and what was changed."""

    spec: object  # dinoscale.spec.SweepSpec (profile rehearsal)
    replica: object  # dinoscale.data.replicas.Replica
    changes: dict[str, str]  # record.REHEARSAL_PREFIX + what -> how (tags on every run, params on the parent)


def _ordered_map(values: list, targets: list) -> dict:
    return {v: targets[i] for i, v in enumerate(values)}


def map_backbones(names: list[str]) -> dict[str, str]:
    """Each backbone -> a rung of a demo ladder, in order of parameter count (the size axis keeps its values
    and its order). A sweep of one family maps onto the DINOv3 demo ladder; a comparison of families keeps
    DINOv3 on it and maps the other families onto the DINOv2 demo ladder (``DOMAIN_LADDER``, a stand-in for
    the domain encoders), so the family comparison is rehearsed too. More backbones than rungs: the largest
    share the top rung (refused by the spec as duplicates, so named in the error)."""
    families = {n: get_backbone(n).family for n in dict.fromkeys(names)}
    dinov3 = [n for n, f in families.items() if f.startswith("dinov3")]
    groups = [(list(families), LADDER)]
    if 0 < len(dinov3) < len(families):
        groups = [(dinov3, LADDER), ([n for n in families if n not in dinov3], DOMAIN_LADDER)]
    out = {}
    for members, ladder in groups:
        by_size = sorted(members, key=lambda n: (backbone_facts(n).n_params or 0, n))
        out |= {n: ladder[min(i, len(ladder) - 1)] for i, n in enumerate(by_size)}
    return out


def map_resolutions(resolutions: list[int], step: int = PATCH) -> dict[int, int]:
    """Resolutions in order -> 32, 48, 64, ... px (multiples of the demo ladder's patch size), or 112, 224, ...
    for two ladders (``step`` ``BOTH_PATCHES``), as many values."""
    first = 2 if step == PATCH else 1
    return _ordered_map(sorted(resolutions), [step * (first + i) for i in range(len(resolutions))])


def _cut(d: dict, cuts: dict, changed: list[str], where: str, defaults: dict | None = None) -> None:
    for key, most in cuts.items():
        value = d.get(key, (defaults or {}).get(key))
        if isinstance(value, int) and value > most:
            d[key] = most
            changed.append(f"{where}.{key} {value}->{most}")


def _field_defaults(model) -> dict:
    return {k: f.default for k, f in model.model_fields.items() if not callable(f.default_factory)}


def transform(
    raw: dict,
    source: str,
    replica_root: Path,
    on_bad_file: str | None = None,
    replicates: int = MAX_SEEDS,
    lean: bool = False,
) -> tuple[dict, dict]:
    """The paper spec (as loaded from its YAML) -> (the rehearsal's spec dict, the changes as record tags).
    Encoders named by family and size (``encoders:``) are expanded into backbones first, so that each maps onto
    the demo ladder like any other backbone."""
    raw = expand_encoders(raw)
    s = copy.deepcopy(raw)
    changes: dict[str, str] = {record.REHEARSAL_SOURCE_SPEC: source}
    s["name"] = f"{raw['name']}-rehearsal"
    s["profile"] = "rehearsal"
    s["description"] = f"REHEARSAL of {source} on a replica: {raw.get('description', '')}".strip()
    s["dataset"] = dict(raw["dataset"], root=str(replica_root))
    if on_bad_file:
        s["dataset"]["on_bad_file"] = on_bad_file
    cut: list[str] = []  # what was scaled down, in order (the rehearsal.cuts tag)
    _scale_grid(raw, s, changes, cut, lean)
    _scale_fits(raw, s, cut)
    _scale_budgets(raw, s, cut, replicates)
    _run_here(raw, s, changes)
    changes[record.REHEARSAL_PREFIX + "cuts"] = "; ".join(cut) or "none"
    return s, changes


def _scale_grid(raw: dict, s: dict, changes: dict[str, str], cut: list[str], lean: bool) -> None:
    """Backbones onto the demo ladder with random weights, resolutions onto its sizes (``lean``: the two ends)."""
    bmap = map_backbones([b["name"] for b in raw["backbones"]])
    s["backbones"] = [dict(b, name=bmap[b["name"]], weights="random") for b in raw["backbones"]]
    ladders = [lad for lad in (LADDER, DOMAIN_LADDER) if any(v in lad for v in bmap.values())]
    if lean and len(s["backbones"]) > 2 * len(ladders):  # the two ends of each ladder
        ends = {
            f(mapped, key=lad.index)
            for lad in ladders
            for f in (min, max)
            for mapped in [[v for v in bmap.values() if v in lad]]
        }
        s["backbones"] = [b for b in s["backbones"] if b["name"] in ends]
        cut.append(f"backbones (lean) {len(bmap)}->{len(s['backbones'])}")
    changes[record.REHEARSAL_PREFIX + "backbones"] = ",".join(
        f"{b['name']}({b.get('weights', 'random')})->{bmap[b['name']]}(random)" for b in raw["backbones"]
    )
    rmap = map_resolutions(list(raw["resolutions"]), BOTH_PATCHES if len(ladders) > 1 else PATCH)
    s["resolutions"] = [rmap[r] for r in raw["resolutions"]]
    if lean and len(s["resolutions"]) > 2:
        s["resolutions"] = [min(s["resolutions"]), max(s["resolutions"])]
        cut.append(f"resolutions (lean) {len(rmap)}->2")
    changes[record.REHEARSAL_PREFIX + "resolutions"] = ",".join(f"{r}->{rmap[r]}" for r in raw["resolutions"])


def _scale_fits(raw: dict, s: dict, cut: list[str]) -> None:
    """Each probe's and each fine-tuning strategy's search cut to the rehearsal's sizes."""

    probes = []
    for p in raw["probes"]:
        p = dict(p)
        cls = probe_spec_class(p)
        _cut(p, CUTS, cut, f"probes.{p.get('kind')}", _field_defaults(cls) if cls else None)
        probes.append(p)
    s["probes"] = probes
    strategies = raw.get("strategies", ["frozen"])
    training = [k for k in strategies if k in training_kinds()]  # any registered training strategy
    if training:
        ft = copy.deepcopy(raw.get("finetuning", {}))
        for kind in training:
            entry = dict(ft.get(kind, {}))
            _cut(entry, FINETUNE_CUTS, cut, f"finetuning.{kind}", _field_defaults(get_strategy(kind).spec))
            if entry.get("budget") is None:
                entry["budget"] = FINETUNE_CUTS["budget"]
                cut.append(f"finetuning.{kind}.budget search.n_trials->{FINETUNE_CUTS['budget']}")
            entry["batch_size"] = min(int(entry.get("batch_size", 32)), 8)
            ft[kind] = entry
        s["finetuning"] = ft


def _scale_budgets(raw: dict, s: dict, cut: list[str], replicates: int) -> None:
    """Search trials, replicates, bootstrap resamples and the extraction batch cut to the rehearsal's."""
    search = dict(raw.get("search", {}))
    if search.get("n_trials", 1) > SEARCH_TRIALS:
        cut.append(f"search.n_trials {search['n_trials']}->{SEARCH_TRIALS}")
        search["n_trials"] = SEARCH_TRIALS
    s["search"] = search
    seeds = list(raw.get("seeds", [0]))
    if len(seeds) > replicates:
        s["seeds"] = seeds[:replicates]
        cut.append(f"seeds {seeds}->{seeds[:replicates]}")
    metrics = copy.deepcopy(raw.get("metrics", {}))
    boot = dict(metrics.get("bootstrap", {}))
    if boot.get("resamples", 1000) > BOOTSTRAP_RESAMPLES:
        cut.append(f"metrics.bootstrap.resamples {boot.get('resamples', 1000)}->{BOOTSTRAP_RESAMPLES}")
        boot["resamples"] = BOOTSTRAP_RESAMPLES
    metrics["bootstrap"] = boot
    s["metrics"] = metrics
    feats = dict(raw.get("features", {}))
    feats["batch_size"] = min(int(feats.get("batch_size", 32)), 32)
    s["features"] = feats
    grid = raw["dataset"].get("grid")
    if grid and max(grid) > GRID_MAX:
        factor = 1
        while max(grid) / factor > GRID_MAX:
            factor *= 2
        s["dataset"]["grid"] = [max(1, g // factor) for g in grid]
        cut.append(f"dataset.grid {list(grid)}->{s['dataset']['grid']}")


def _run_here(raw: dict, s: dict, changes: dict[str, str]) -> None:
    """On this machine (one CPU per task, no cluster address, no stated node memory), in its own experiment."""
    res = dict(raw.get("resources", {}))
    res.update({"cpus_per_trial": 1, "cpus_per_extraction": 1})
    res.pop("node_memory_gb", None)
    s["resources"] = res
    changes[record.REHEARSAL_PREFIX + "resources"] = "cpus_per_trial=1,cpus_per_extraction=1"
    s["ray"] = {k: v for k, v in raw.get("ray", {}).items() if k != "address"}
    tracking = dict(raw.get("tracking", {}))
    tracking["experiment"] = f"{tracking.get('experiment') or 'dinoscale-' + raw['name']}-rehearsal"
    s["tracking"] = tracking


def _raw_spec(path: Path, overrides: Sequence[str] = ()) -> dict:
    load_spec(path, overrides)  # the paper spec itself must validate (its own errors, named against its own file)
    return load_raw(path, overrides)  # its `extends` merged, the --set overrides applied


def prepare(
    spec_path: str | Path,
    variant: str = "ok",
    on_bad_file: str | None = None,
    seed: int = 0,
    project_dir: Path | None = None,
    replicates: int = MAX_SEEDS,
    lean: bool = False,
    overrides: Sequence[str] = (),
) -> Rehearsal:
    """Validate the paper spec, write its dataset's replica (``variant``) under the sweep's storage
    (``<storage>/rehearsal/<dataset>/<variant>``, rewritten each time) and return the rehearsal's spec."""
    from dinoscale.data import is_phantom
    from dinoscale.data.replicas import VARIANTS, get_replica, replica_names
    from dinoscale.sweep.plan import storage_root

    spec_path = Path(spec_path)
    raw = _raw_spec(spec_path, overrides)
    paper = parse_spec(raw, source=str(spec_path))
    name = paper.dataset.name
    if is_phantom(name):
        raise RehearsalError(
            f"{spec_path}: dataset '{name}' is generated (a phantom): a demo runs as it is with `dinoscale sweep`; "
            f"rehearse a paper spec (sweeps/<modality>.yaml) instead"
        )
    try:
        writer = get_replica(name)
    except KeyError:
        raise RehearsalError(
            f"{spec_path}: dataset '{name}' has no replica writer, so it cannot be rehearsed; datasets with one: "
            f"{', '.join(replica_names()) or 'none'} (a writer: @register_replica in dinoscale/data/replicas/)"
        ) from None
    if variant not in VARIANTS:
        raise RehearsalError(f"--variant '{variant}': expected one of {', '.join(VARIANTS)}")
    if variant not in ("ok", *writer.variants):
        raise RehearsalError(
            f"--variant {variant}: the {name} replica cannot write it (its variants: ok, {', '.join(writer.variants)})"
        )
    base = storage_root(paper.storage, project_dir) / "rehearsal"
    replica = writer.write(_fresh(base / name / variant), paper.dataset, variant=variant, seed=seed)
    s, changes = transform(raw, str(spec_path), replica.root, on_bad_file, replicates, lean)
    external = _external_replicas(paper, s, base, seed, str(spec_path))
    if external:
        changes[record.REHEARSAL_PREFIX + "external_replicas"] = ", ".join(external)
    changes.update(
        {
            record.REHEARSAL_SOURCE_DIGEST: paper.digest(),
            record.REHEARSAL_VARIANT: variant,
            record.REHEARSAL_REPLICA: str(replica.root),
            record.REHEARSAL_PREFIX + "replica_seed": str(seed),
        }
    )
    if replica.broken:
        changes[record.REHEARSAL_PREFIX + "broken"] = replica.broken
    return Rehearsal(parse_spec(s, source=f"{spec_path} (rehearsal)"), replica, changes)


def _fresh(root: Path) -> Path:
    """An empty folder for a replica (rewritten each time)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root


def _external_replicas(paper, s: dict, base: Path, seed: int, spec_path: str) -> list[str]:
    """The replica of each external test set's dataset (``<storage>/rehearsal/<dataset>/external-<label>``),
    its ``root`` in the rehearsal's spec pointed there; generated (phantom) external sets stay as they are."""
    from dinoscale.data import is_phantom
    from dinoscale.data.replicas import get_replica, replica_names

    written = []
    for i, e in enumerate(paper.external or []):
        if is_phantom(e.dataset.name):
            continue
        try:
            writer = get_replica(e.dataset.name)
        except KeyError:
            raise RehearsalError(
                f"{spec_path}: external '{e.label}': dataset '{e.dataset.name}' has no replica writer, so it cannot "
                f"be rehearsed; datasets with one: {', '.join(replica_names())}"
            ) from None
        # another seed than the internal replica's: other patients, other images
        replica = writer.write(_fresh(base / e.dataset.name / f"external-{e.label}"), e.dataset, seed=seed + 1 + i)
        s["external"][i]["dataset"] = dict(s["external"][i]["dataset"], root=str(replica.root))
        written.append(f"{e.label}: {replica.root}")
    return written


def rehearse(
    spec_path: str | Path,
    variant: str = "ok",
    on_bad_file: str | None = None,
    seed: int = 0,
    analyze: bool = True,
    quiet: bool = False,
    project_dir: Path | None = None,
    replicates: int = MAX_SEEDS,
    lean: bool = False,
    overrides: Sequence[str] = (),
    verbose: bool = False,
):
    """Write the replica and run the rehearsal's sweep; returns (Rehearsal, SweepOutcome). ``overrides``:
    ``key.path=value`` changes to the paper spec (``--set``), applied before the rehearsal's own. ``verbose``:
    library logs and warnings on the terminal too."""
    from dinoscale.sweep.runner import run_sweep

    capture_third_party(None, verbose)  # held until the sweep names its log file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to fetch, fail at once if asked
    r = prepare(spec_path, variant, on_bad_file, seed, project_dir, replicates, lean, overrides)
    if not quiet:
        console.print(
            f"[bold magenta]REHEARSAL[/bold magenta] of {spec_path}: replica of '{r.replica.dataset}' "
            f"({variant}) written to {r.replica.root}",
        )
        for k, v in r.changes.items():
            console.print(f"  {k.removeprefix(record.REHEARSAL_PREFIX)}: {v}", markup=False, highlight=False)
    out = run_sweep(
        r.spec,
        project_dir=project_dir,
        analyze=analyze,
        quiet=quiet,
        annotations={record.REHEARSAL: "true", **r.changes, **provenance_tags(spec_path, overrides)},
        verbose=verbose,
    )
    return r, out
