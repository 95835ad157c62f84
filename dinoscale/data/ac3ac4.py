"""AC3 / AC4 (Kasthuri et al. 2015, mouse somatosensory cortex, serial-section EM): neuron instance segmentation
by affinities, scored like CREMI (VOI split / merge, adapted Rand error).

Two dense-labelled crops of the Kasthuri volume, 1024 x 1024 px at 6 x 6 x 29-30 nm: AC4 (100 sections, the
SNEMI3D training volume) and AC3 (256 sections; its first 100 are the SNEMI3D test volume). The benchmark protocol
(the AC3/AC4 setting of Huang et al.'s SSNS-Net and of the reference benchmark) trains on AC4's first 80
sections, validates on AC4's last 20 and tests on AC3's first 100. The split is fixed by the protocol: replicates
vary the initialisation only.

Layout read (the HDF5 conversion used by the community code, e.g. SSNS-Net and its descendants; the original
package is https://lichtman.rc.fas.harvard.edu/vast/AC3AC4Package.zip, whose inner layout we could not read)::

    AC3_inputs.h5, AC3_labels.h5, AC4_inputs.h5, AC4_labels.h5
        dataset 'main' [z, y, x]: EM intensities (uint8) / neuron ids (integers, 0 = unlabelled)

Verified from public code and READMEs: the four file names, the 'main' key, [z, y, x] order, AC4's 100 x 1024 x
1024, 6 x 6 x 29 nm (one README; the SNEMI3D pages say 6 x 6 x 30), AC3's 256 sections (SNEMI3D: test = AC3's
first 100, the last 156 a validation volume). Not verified: the label dtype (any integer type is accepted) and
whether the files carry a ``resolution`` attribute (where they do not, the metrics take 6 x 6 x 29 nm: CREMI's
25 nm border mask is then ~4 px wide, not the 6 px of CREMI's 4 nm pixels).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from dinoscale.data.adapters import _real
from dinoscale.data.dataset import DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import data_root

LAYOUT = """    AC3_inputs.h5, AC3_labels.h5, AC4_inputs.h5, AC4_labels.h5
        dataset 'main' [z, y, x]: EM sections (uint8) / neuron ids (integers)"""
SOURCE = (
    "Kasthuri et al. 2015 (https://lichtman.rc.fas.harvard.edu/vast/AC3AC4Package.zip), as the HDF5 files of "
    "the AC3/AC4 benchmark code (e.g. SSNS-Net, Huang et al. 2022)"
)
KEY = "main"
# (volume, first section, end section) per split: the protocol's fixed cut
PROTOCOL = {"train": ("AC4", 0, 80), "val": ("AC4", 80, 100), "test": ("AC3", 0, 100)}
SPACING_NM = (6.0, 6.0, 29.0)  # [x, y, z]: 6 x 6 nm pixels, 29 nm sections (30 nm on the SNEMI3D pages)
SPLIT = "train AC4 sections 0-79, val AC4 80-99, test AC3 sections 0-99"


def _shape(path: Path) -> tuple[int, ...]:
    try:
        with h5py.File(path, "r") as f:
            d = f[KEY]
            if not np.issubdtype(d.dtype, np.number):
                raise DataError(f"{path}: dataset '{KEY}' holds {d.dtype}, not numbers")
            return tuple(int(s) for s in d.shape)
    except (OSError, KeyError) as e:
        raise DataError(f"{path}: not an AC3/AC4 volume with a dataset '{KEY}' ({type(e).__name__}: {e})") from e


def _volume(root: Path, name: str, need: int) -> tuple[Path, Path]:
    raw, lab = root / f"{name}_inputs.h5", root / f"{name}_labels.h5"
    for p in (raw, lab):
        if not p.is_file():
            raise DataError(f"AC3/AC4: {p} not found. Expected layout:\n{LAYOUT}\nSource: {SOURCE}")
    rs, ls = _shape(raw), _shape(lab)
    if len(rs) != 3:
        raise DataError(f"{raw}: dataset '{KEY}' has shape {rs}; expected [z, y, x]")
    if rs != ls:
        raise DataError(f"{lab}: dataset '{KEY}' shape {ls} does not match {raw.name} {rs}")
    if rs[0] < need:
        raise DataError(f"{raw}: {rs[0]} sections; the protocol reads sections 0-{need - 1}")
    with h5py.File(lab, "r") as f:
        if not np.issubdtype(f[KEY].dtype, np.integer):
            raise DataError(f"{lab}: neuron ids stored as {f[KEY].dtype}; expected integers")
    return raw, lab


@register_dataset(
    "ac3ac4",
    task="instance_segmentation",
    published=PublishedSize(
        3,
        "block",
        per_unit=200 / 3,
        pixels=(1024, 1024),
        source="Kasthuri et al. 2015, AC3 / AC4 crops (1024 x 1024 px, 6 x 6 x 29 nm): the protocol reads AC4's 100 "
        "sections (train 80, val 20) and AC3's first 100 (test)",
    ),
    replicates="fixed",
    split_rule=SPLIT,
)
def prepare_ac3ac4(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "AC3/AC4", LAYOUT, SOURCE)
    need = {name: max(z1 for v, _, z1 in PROTOCOL.values() if v == name) for name in ("AC4", "AC3")}
    files = {name: _volume(root, name, n) for name, n in need.items()}
    rows = []
    for split, (name, z0, z1) in PROTOCOL.items():
        raw, lab = files[name]
        rows.append(
            {
                "sample_id": f"{name}:{z0}-{z1}",
                "patient_id": f"{name}:{split}",
                "sample": name,
                "path": str(raw),
                "mask_path": str(lab),
                "volume_key": KEY,
                "mask_key": KEY,
                "z_start": z0,
                "z_stop": z1,
                "n_slices": z1 - z0,
                "split": split,
            }
        )
    return PreparedDataset(
        spec.name,
        "instance_segmentation",
        [],
        pd.DataFrame(rows),
        _real(spec, "AC3/AC4", root, SPLIT),
        root,
        replicates="fixed",
        replicates_reason=SPLIT,
        stated_spacing=SPACING_NM,  # the files record none (the CREMI border mask needs the pixel size)
    )
