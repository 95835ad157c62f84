"""AC3 / AC4 replica: the four HDF5 volumes the AC3/AC4 benchmark code reads, written small.

Written under ``root``::

    AC4_inputs.h5, AC4_labels.h5    dataset 'main' [z, y, x]: uint8 sections / uint32 neuron ids, 100 sections
    AC3_inputs.h5, AC3_labels.h5    the same, more sections than the 100 the protocol tests on

The protocol's cut (train AC4 0-79, val AC4 80-99, test AC3 0-99) is the adapter's (``dinoscale.data.ac3ac4``),
where the sources and what is verified are named.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from dinoscale.data.phantoms3d import _render_em
from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import truncate

SIDE = 24  # px per section side (real: 1024)
SECTIONS = {"AC4": 100, "AC3": 108}  # real: 100 and 256; the protocol reads AC4 0-99 and AC3 0-99


@register_replica("ac3ac4", variants=("corrupt_file", "mask_shape"))
def write_ac3ac4(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for j, (name, depth) in enumerate(SECTIONS.items()):
        img, ids = _render_em(SIDE, depth, np.random.default_rng([seed, 2000 + j]), k=24)
        raw = np.ascontiguousarray(np.transpose(img, (2, 1, 0))).astype(np.uint8)  # [z, y, x]
        lab = np.ascontiguousarray(np.transpose(ids, (2, 1, 0))).astype(np.uint32)
        if variant == "mask_shape" and name == "AC3":
            lab = lab[:, :-8, :]  # a label volume cropped differently from its sections
        for kind, arr in (("inputs", raw), ("labels", lab)):
            path = root / f"{name}_{kind}.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("main", data=arr, compression="gzip")
            written[path.name] = path
    broken = None
    if variant == "corrupt_file":
        broken = truncate(written["AC3_inputs.h5"], keep=0.3)
    elif variant == "mask_shape":
        broken = f"{written['AC3_labels.h5']}: {SIDE - 8} rows per section, AC3_inputs.h5 {SIDE}"
    return Replica(
        root=root,
        dataset="ac3ac4",
        broken=broken,
        reproduces=[
            "file names AC3_inputs.h5, AC3_labels.h5, AC4_inputs.h5, AC4_labels.h5; one dataset 'main' per file, "
            "[z, y, x], uint8 sections, integer neuron ids",
            "AC4's 100 sections (train 0-79, val 80-99) and an AC3 longer than the 100 sections the protocol tests "
            "on; neurons continuing across anisotropic sections",
        ],
        leaves_out=[
            f"{SIDE}^2 px per section (real: 1024^2); AC3 {SECTIONS['AC3']} sections (real: 256)",
            "the label dtype of the real files (uint32 written; not verified) and any resolution attribute (none "
            "written: 6 x 6 x 29 nm is not stored)",
            "real membranes and organelles (Voronoi cells with dark boundaries and a few dark blobs); the original "
            "AC3AC4Package.zip layout, which the benchmark code converts to these HDF5 files",
        ],
    )
