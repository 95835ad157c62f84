"""Patient-level splits: a patient's images always land in one split."""

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
