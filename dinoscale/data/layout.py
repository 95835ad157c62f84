"""Helpers shared by the published-layout adapters: the data root, labels, splits, atomic generation."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from dinoscale.data.dataset import DataError
from dinoscale.data.splits import assign_patient_folds, assign_patient_splits, carve_val_from_train


def data_root(spec, title: str, layout: str, source: str, want_file: bool = False) -> Path:
    """The spec's root with ${ENV} expanded; a missing one is an error naming the layout and the source."""
    root = Path(os.path.expandvars(spec.root)).expanduser()
    ok = root.is_file() if want_file else root.is_dir()
    if not ok:
        unset = re.findall(r"\$\{?(\w+)", str(root))
        hint = f" (environment variable(s) {', '.join(unset)} not set)" if unset else ""
        raise DataError(
            f"{title}: data root '{root}'{hint} does not exist. Expected layout:\n{layout}\nSource: {source}"
        )
    return root


def require(path: Path, title: str, layout: str) -> Path:
    if not path.exists():
        raise DataError(f"{title}: {path} not found. Expected layout:\n{layout}")
    return path


def check_labels(found: Iterable[str], classes: list[str], where: Callable[[str], str]) -> None:
    """Every label must be in the class list; the error names the label and where it was found."""
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{where(unknown[0])}: label(s) {unknown} not in the class list {classes}")


def patient_splits(df: pd.DataFrame, spec, official: pd.Series | None = None) -> tuple[pd.Series, str]:
    """Official split (a Series of train/val/test, or train/test + val carved by patient) when the
    dataset has one and the spec allows it; else a patient-level random split."""
    if official is not None and spec.split.official:
        split = official.astype(str)
        if not (split == "val").any():
            split = carve_val_from_train(df.assign(split=split), spec.split.val_fraction, spec.split.seed)
        return split, "official" + ("" if (official == "val").any() else " + patient-level val")
    return assign_patient_splits(
        df["patient_id"], spec.split.val_fraction, spec.split.test_fraction, spec.split.seed
    ), "patient-level random"


def fold_splits(df: pd.DataFrame, spec, default_folds: int, unit: str = "patients") -> str:
    """Cross-validation by patient where the protocol asks for it (``split.folds``, else ``default_folds``; 0: a
    patient-level split instead): ``split`` and ``fold`` columns set on ``df`` (replicate k validates on fold k,
    a test share of the ``unit`` held out). Returns how the split was made (the ``data.split`` tag)."""
    folds = default_folds if spec.split.folds is None else spec.split.folds
    if not folds:
        df["split"], how = patient_splits(df, spec)
        return how
    df["split"], df["fold"] = assign_patient_folds(df["patient_id"], folds, spec.split.test_fraction, spec.split.seed)
    return f"{folds}-fold cross-validation by {unit.rstrip('s')} (test: {spec.split.test_fraction:g} of the {unit} held out)"


def atomic_dir(out_dir: Path, write: Callable[[Path], None], marker: str = "manifest.csv") -> None:
    """Run ``write(tmp)`` and rename tmp to ``out_dir``; a concurrent identical writer loses harmlessly.
    ``marker``: the file whose presence means ``out_dir`` is complete (then nothing is written)."""
    if (out_dir / marker).exists():
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / marker).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
