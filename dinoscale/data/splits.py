"""Patient-level splits: a patient's images always land in one split; replicates regroup train and val."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dinoscale.data.dataset import DataError


class LeakageError(DataError):
    """A patient in two splits (train and test would share a patient)."""

    kind = "leakage"


def assign_patient_splits(patient_ids: pd.Series, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """Shuffle the unique patients with ``seed`` and cut them into train/val/test by fraction.

    Depends only on the set of patient ids (sorted first), not on row order.
    """
    patients = np.array(sorted(set(patient_ids.astype(str))))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    n_test = max(1, int(round(test_fraction * len(patients))))
    n_val = max(1, int(round(val_fraction * len(patients))))
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[patients[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return patient_ids.astype(str).map(split_of)


def assign_patient_folds(
    patient_ids: pd.Series, folds: int, test_fraction: float, seed: int
) -> tuple[pd.Series, pd.Series]:
    """Cross-validation by patient: a test share of the patients held out (as ``assign_patient_splits``), the
    others shuffled with ``seed`` and dealt into ``folds`` folds of near-equal patient counts. Returns
    (split, fold): fold 0 is the dataset's val split (replicate 0), the other folds train; test rows fold -1.
    Depends only on the set of patient ids."""
    patients = np.array(sorted(set(patient_ids.astype(str))))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    n_test = max(1, int(round(test_fraction * len(patients))))
    if len(patients) - n_test < folds:
        raise DataError(
            f"{len(patients)} patients leave {len(patients) - n_test} for {folds} cross-validation folds after "
            f"{n_test} test patients; lower dataset.split.folds or add patients"
        )
    fold_of = {}
    for rank, idx in enumerate(order):
        fold_of[patients[idx]] = -1 if rank < n_test else (rank - n_test) % folds
    fold = patient_ids.astype(str).map(fold_of).astype(int)
    split = fold.map(lambda f: "test" if f < 0 else "val" if f == 0 else "train")
    return split, fold


def carve_val_from_train(manifest: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """For datasets with an official train/test list only: move a share of train *patients* to val."""
    split = manifest["split"].copy()
    train_patients = np.array(sorted(set(manifest.loc[split == "train", "patient_id"].astype(str))))
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_fraction * len(train_patients))))
    val_patients = set(train_patients[rng.permutation(len(train_patients))[:n_val]])
    split[(split == "train") & manifest["patient_id"].astype(str).isin(val_patients)] = "val"
    return split


def check_no_leakage(manifest: pd.DataFrame) -> None:
    """Refuse a manifest in which one patient appears in two splits."""
    per_patient = manifest.groupby(manifest["patient_id"].astype(str))["split"].unique()
    leaked = per_patient[per_patient.map(len) > 1]
    if len(leaked):
        examples = ", ".join(f"{p} in {'+'.join(sorted(leaked[p]))}" for p in leaked.index[:5])
        raise LeakageError(
            f"{len(leaked)} patient(s) appear in more than one split (e.g. {examples}); "
            "splits must be patient-level. Fix the split lists or let dinoscale split by patient."
        )


def replicate_recipe(seed: int, split_seed: int, dataset_policy: str, spec_policy: str, folds: int = 0) -> dict:
    """How replicate ``seed`` of a sweep draws its train / val split, as data (part of the cell and its key).

    - ``fold``: the dataset has cross-validation folds: replicate k validates on fold k mod folds and trains on
      the others (test untouched);
    - ``dataset``: the split as the dataset prepared it (replicate 0 always, and every replicate where the
      dataset or the spec fixes the split, e.g. CREMI's first sections train);
    - ``resplit``: train and val patients pooled and redrawn, val keeping its number of patients, with a
      generator seeded by (split seed, replicate) (test untouched).
    """
    if folds:
        return {"mode": "fold", "fold": int(seed) % folds, "folds": int(folds)}
    if seed == 0 or dataset_policy == "fixed" or spec_policy == "fixed":
        return {"mode": "dataset"}
    return {"mode": "resplit", "seed": [int(split_seed), int(seed)]}


def describe_recipe(recipe: dict) -> str:
    """One line for the record (a run param) and the protocol table."""
    mode = recipe.get("mode", "dataset")
    subset = f"; {describe_train_subset(recipe['train'])}" if recipe.get("train") else ""
    if mode == "fold":
        return f"validation fold {recipe['fold']} of {recipe['folds']}" + subset
    if mode == "resplit":
        return f"train/val patients redrawn (seed {recipe['seed'][0]}, replicate {recipe['seed'][1]})" + subset
    return "the dataset's split" + subset


def replicate_indices(
    train_patients, val_patients, recipe: dict, train_folds=None, val_folds=None, labels=None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into train units followed by val units) of a replicate's train and val units; a patient's
    units always stay together. Test is never touched. A recipe with a training subset (``recipe['train']``,
    the training-set-size axis) keeps only that subset of the replicate's train patients, drawn stratified by
    ``labels`` (the train then val units' labels); val stays whole."""
    tr, va = _replicate_split(train_patients, val_patients, recipe, train_folds, val_folds)
    if recipe.get("train"):
        pids = np.concatenate([np.asarray(train_patients), np.asarray(val_patients)]).astype(str)
        y = None if labels is None else np.asarray(labels)[tr]
        tr = tr[train_subset_indices(pids[tr], y, recipe["train"])]
    return tr, va


def _replicate_split(train_patients, val_patients, recipe: dict, train_folds, val_folds):
    nt, nv = len(train_patients), len(val_patients)
    mode = recipe.get("mode", "dataset")
    if mode == "dataset":
        return np.arange(nt), nt + np.arange(nv)
    if mode == "fold":
        if train_folds is None or val_folds is None:
            raise ValueError("a fold replicate needs the units' folds (the dataset's manifest has no 'fold' column)")
        folds = np.concatenate([np.asarray(train_folds), np.asarray(val_folds)]).astype(int)
        is_val = folds == int(recipe["fold"])
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if mode != "resplit":
        raise ValueError(f"unknown replicate mode '{mode}' (dataset, resplit, fold)")
    pids = np.concatenate([np.asarray(train_patients), np.asarray(val_patients)]).astype(str)
    patients = np.array(sorted(set(pids)))
    n_val = len(set(np.asarray(val_patients).astype(str)))
    rng = np.random.default_rng(list(recipe["seed"]))
    val_set = set(patients[rng.permutation(len(patients))[:n_val]])
    is_val = np.array([p in val_set for p in pids])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ---------------------------------------------------------------- training-set size (label efficiency)

TRAIN_SIZE_UNITS = {  # spec key -> what a value of the axis counts
    "fractions": "of the train patients",
    "patients": "train patients",
    "shots": "train patients per class",
}


def train_size_label(unit: str, value: float) -> str:
    """The axis value of a training-set size, as cell ids, params and the report write it: a fraction as
    itself (``0.1``), a count of patients ``20pt``, k patients per class ``5shot``."""
    if unit == "fractions":
        return f"{float(value):g}"
    return f"{int(value)}{'pt' if unit == 'patients' else 'shot'}"


def train_subset_recipe(unit: str, value: float, split_seed: int, seed: int) -> dict:
    """How replicate ``seed`` draws its training subset, as data (part of the replicate recipe and the cell's
    key). The draw's generator depends on (split seed, replicate) only, never on the size: the sizes of one
    replicate are nested."""
    return {"unit": unit, "value": float(value), "seed": [int(split_seed), int(seed), 1]}


def describe_train_subset(sub: dict) -> str:
    unit, v = sub["unit"], sub["value"]
    size = f"{v:.3g} {TRAIN_SIZE_UNITS[unit]}" if unit == "fractions" else f"{int(v)} {TRAIN_SIZE_UNITS[unit]}"
    return f"training subset: {size}, by patient, stratified by label, nested across sizes (seed {sub['seed'][:2]})"


def _patient_strata(pids: np.ndarray, labels) -> tuple[np.ndarray, list[str]]:
    """The sorted unique patients and each one's stratum: the classes positive in any of its units ('' for none,
    or where the task has no classes)."""
    patients = np.array(sorted(set(pids)))
    if labels is None or np.asarray(labels).ndim != 2 or np.asarray(labels).shape[1] == 0:
        return patients, [""] * len(patients)
    y = np.asarray(labels) > 0
    pos: dict[str, set] = {p: set() for p in patients}
    for p, row in zip(pids, y):
        pos[p].update(np.flatnonzero(row).tolist())
    return patients, [",".join(map(str, sorted(pos[p]))) for p in patients]


def stratified_order(patients: np.ndarray, strata: list[str], seed) -> np.ndarray:
    """The patients in the order a replicate admits them: each stratum shuffled, then the strata interleaved
    by systematic sampling (the r-th patient of a stratum of n sits at (r + u) / n, u drawn per stratum), so the
    first m patients hold each stratum's share of m to within one patient, for every m at once."""
    rng = np.random.default_rng(list(seed))
    strata = np.asarray(strata, dtype=object)
    key = np.empty(len(patients))
    for s in sorted(set(strata)):
        members = np.flatnonzero(strata == s)
        ranks = rng.permutation(len(members))
        key[members] = (ranks + rng.random()) / len(members)
    tie = rng.random(len(patients))
    return patients[np.lexsort((tie, key))]


def train_subset_patients(pids, labels, sub: dict) -> set[str]:
    """The patients of a replicate's training subset (``sub``: ``train_subset_recipe``). Fractions and counts take
    the first patients of ``stratified_order`` (at least one); k shots take, for each class, the first k
    patients positive for it (a class with fewer keeps all of its own; a task without classes: k patients).
    Every size is a prefix of one order per replicate, so a smaller size's patients are inside a larger's."""
    pids = np.asarray(pids).astype(str)
    patients, strata = _patient_strata(pids, labels)
    order = stratified_order(patients, strata, sub["seed"])
    unit, value = sub["unit"], sub["value"]
    if unit == "fractions":
        return set(order[: max(1, int(round(value * len(order))))])
    if unit == "patients":
        return set(order[: int(value)])
    k = int(value)
    classes = sorted({c for s in strata for c in s.split(",") if c})
    if not classes:
        return set(order[:k])
    stratum_of = dict(zip(patients, strata))
    chosen: set[str] = set()
    for c in classes:
        positives = [p for p in order if c in stratum_of[p].split(",")]
        chosen.update(positives[:k])
    return chosen


def train_subset_indices(pids, labels, sub: dict | None) -> np.ndarray:
    """Positions of the units of a replicate's training subset (all positions without ``sub``)."""
    pids = np.asarray(pids).astype(str)
    if not sub:
        return np.arange(len(pids))
    keep = train_subset_patients(pids, labels, sub)
    return np.flatnonzero(np.array([p in keep for p in pids], dtype=bool))
