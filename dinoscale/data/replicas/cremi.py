"""CREMI replica (cremi.org/data): the three training samples as published.

Written under ``root``::

    sample_A_20160501.hdf, sample_B_20160501.hdf, sample_C_20160501.hdf
        volumes/raw                  uint8  [z, y, x], attribute resolution = (40.0, 4.0, 4.0) nm
        volumes/labels/neuron_ids    uint64 [z, y, x], same resolution

The protocol cut (first sections train, last test) is the adapter's (``dinoscale.data.adapters.cremi_rows``).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from dinoscale.data.phantoms3d import EM_SAMPLES, _render_em
from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import truncate

SECTIONS = 25  # per sample (real: 125); the 20% test cut is 5 sections (real: the last 25)
SIDE = 64  # px per section side (real: 1250)
RESOLUTION = (40.0, 4.0, 4.0)  # nm, [z, y, x]


@register_replica("cremi", variants=("corrupt_file", "mask_shape"))
def write_cremi(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    root = Path(root)
    wanted = [s.strip() for s in (spec.subset or "A,B,C").split(",")]
    files = []
    for j, sample in enumerate(wanted):
        img, ids = _render_em(SIDE, SECTIONS, np.random.default_rng([seed, 1000 + j]), k=EM_SAMPLES.get(sample, 30))
        path = root / f"sample_{sample}_20160501.hdf"
        with h5py.File(path, "w") as f:
            raw = np.ascontiguousarray(np.transpose(img, (2, 1, 0))).astype(np.uint8)
            lab = np.ascontiguousarray(np.transpose(ids, (2, 1, 0))).astype(np.uint64)
            if variant == "mask_shape" and j == len(wanted) - 1:
                lab = lab[:, :-8, :]  # a label volume cropped differently from its raw data
            for key, arr in (("volumes/raw", raw), ("volumes/labels/neuron_ids", lab)):
                d = f.create_dataset(key, data=arr, compression="gzip")
                d.attrs["resolution"] = RESOLUTION
        files.append(path)
    broken = None
    if variant == "corrupt_file":
        broken = truncate(files[-1], keep=0.3)
    elif variant == "mask_shape":
        broken = f"{files[-1]}: volumes/labels/neuron_ids {SIDE - 8} rows, raw {SIDE}"
    return Replica(
        root=root,
        dataset="cremi",
        subset=",".join(wanted),
        reproduces=[
            "file names sample_{A,B,C}_20160501.hdf, HDF5 datasets volumes/raw (uint8) and "
            "volumes/labels/neuron_ids (uint64), [z, y, x], resolution attribute (40, 4, 4) nm",
            "anisotropic sections (10x thicker than a pixel), neurons continuing across sections",
        ],
        leaves_out=[
            f"{SECTIONS} sections of {SIDE}^2 px per sample (real: 125 of 1250^2)",
            "volumes/labels/clefts, annotations (synapses), the padded test volumes A+/B+/C+",
            "real membranes (Voronoi cells with dark boundaries)",
        ],
        broken=broken,
    )
