"""``dinoscale calibrate``: measure the CPU figures of the plan's budget on the machine it runs on.

For each input kind it writes synthetic files in the published formats (a 1024 px grey PNG radiograph, a
1024 px RGB JPEG, a 224 px RGB slide tile, a 1024 px 8-bit DICOM radiograph, a 512 x 512 x 32 int16 NIfTI.gz
CT, a 1250 px x 8-section HDF5 EM block, 224 px images and 64^3 volumes in an uncompressed ``.npz``) and
times, on one core, the real path of an extraction: the readers of ``dinoscale.data.readers`` and the resize
of ``dinoscale.data.preprocess`` to 224 px (2D images: the separable anti-aliased resize; volumes: the volume
transform, MONAI's per-slice resize with Gaussian anti-aliasing). Synthetic pixels compress differently from real ones (a smooth phantom
plus noise): the figures are of the right order, not exact for a given dataset. It also times a demo-ladder
ViT forward pass on one core (GFLOP/s, FLOPs counted on the model). The result is a JSON file the plan reads
(``DINOSCALE_CALIBRATION``), or with ``--python`` the table to ship in ``dinoscale/sweep/budget.py``.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from dinoscale.data.preprocess import resize_antialiased
from dinoscale.data.readers import read_hdf5_ref, read_image, read_npz_ref
from dinoscale.data.refs import hdf5_ref, npz_ref
from dinoscale.features.recipe import FeatureRecipe
from dinoscale.sweep import budget

RESOLUTION = 224


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _image(rng, side: int, channels: int = 1) -> np.ndarray:
    """A smooth phantom (a disc and a gradient) with noise, 8-bit: compresses like a radiograph, roughly."""
    y, x = np.mgrid[0:side, 0:side] / side
    base = 120 + 80 * np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.08) + 30 * x
    img = np.clip(base[..., None] + rng.normal(0, 8, (side, side, channels)), 0, 255).astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def _resize(arr: np.ndarray) -> None:
    t = torch.as_tensor(arr, dtype=torch.float32)
    t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
    resize_antialiased(t, RESOLUTION)


def _writers(root: Path, rng) -> dict[str, tuple[Callable[[], None], int, int, int]]:
    """kind -> (read + preprocess one unit, inputs per unit, pixels per input, bytes per input)."""

    from dinoscale.data.preprocess import build_volume_transform

    load_volume, slice_transform = build_volume_transform(
        FeatureRecipe("calibration", "random", RESOLUTION, (0.5,) * 3, (0.5,) * 3, antialias="gaussian", view="slices")
    )
    out = {}
    for kind, side, ch, suffix in (("png", 1024, 1, "png"), ("jpeg", 1024, 3, "jpg"), ("tile", 224, 3, "png")):
        p = root / f"{kind}.{suffix}"
        Image.fromarray(_image(rng, side, ch)).save(p, quality=90) if suffix == "jpg" else Image.fromarray(
            _image(rng, side, ch)
        ).save(p)
        out[kind] = (lambda p=p: _resize(read_image(p)), 1, side * side, p.stat().st_size)
    from dinoscale.data.replicas.rsna import _write_dicom

    p = root / "x.dcm"
    _write_dicom(p, _image(rng, 1024), "calibration", rng)
    out["dicom"] = (lambda p=p: _resize(read_image(p)), 1, 1024 * 1024, p.stat().st_size)
    import nibabel as nib

    depth = 32
    vol = (_image(rng, 512).astype(np.int16)[..., None] * 8 - 1000).repeat(depth, axis=2)
    p = root / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 1.5, 1.0])), str(p))

    def nifti(p=p):  # the extraction's own volume path: read_volume, intensity mapping, MONAI per-slice resize
        v = load_volume(str(p))
        for k in range(v.shape[-1]):
            slice_transform(v[..., k])

    out["nifti_gz"] = (nifti, depth, 512 * 512, p.stat().st_size // depth)
    p = root / "volumes.npz"  # MedMNIST+ 3D: 64^3 items of an uncompressed .npz
    np.savez(p, train_images=np.stack([np.stack([_image(rng, 64)] * 64, axis=-1) for _ in range(4)]))

    def npz_volume(p=p):
        v = torch.as_tensor(read_npz_ref(npz_ref(str(p), "train_images", 0)).astype(np.float32))
        for k in range(v.shape[-1]):
            slice_transform(v[..., k])

    out["npz_volume"] = (npz_volume, 64, 64 * 64, 64 * 64)

    p, sections = root / "em.h5", 8
    with h5py.File(p, "w") as f:
        f["raw"] = np.stack([_image(rng, 1250) for _ in range(sections)])

    def hdf5(p=p):
        v = read_hdf5_ref(hdf5_ref(str(p), "raw", 0, sections))
        for k in range(v.shape[-1]):
            _resize(v[..., k])

    out["hdf5"] = (hdf5, sections, 1250 * 1250, p.stat().st_size // sections)
    p = root / "items.npz"
    np.savez(p, train_images=np.stack([_image(rng, 224) for _ in range(16)]))
    idx = iter(range(10**9))
    out["npz_item"] = (
        lambda: _resize(read_npz_ref(npz_ref(str(p), "train_images", next(idx) % 16))),
        1,
        224 * 224,
        224 * 224,
    )
    return out


def _time(fn: Callable[[], None], min_seconds: float) -> float:
    fn()  # warm: imports, caches
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def encoder_gflops(min_seconds: float, name: str = "dinov3-demo-m", batch: int = 8) -> float:
    """GFLOP/s of a demo-ladder ViT's forward pass at 224 px on one core (fp32)."""
    from dinoscale.models import gflops_per_image, load_backbone

    model = load_backbone(name, "random").model.eval()
    x = torch.randn(batch, 3, RESOLUTION, RESOLUTION)
    with torch.inference_mode():
        seconds = _time(lambda: model.forward_features(x), min_seconds)
    return gflops_per_image(name, RESOLUTION) * batch / seconds


def calibrate(min_seconds: float = 1.0, progress: Callable[[str], None] | None = None) -> dict:
    """The CPU table of the budget, measured here (one thread)."""
    load = os.getloadavg()[0]  # the machine may be shared: the figures are of this moment
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        decode = {}
        with tempfile.TemporaryDirectory() as tmp:
            for kind, (fn, per_unit, pixels, nbytes) in _writers(Path(tmp), rng).items():
                decode[kind] = {"seconds": _time(fn, min_seconds) / per_unit, "pixels": pixels, "bytes": int(nbytes)}
                if progress:
                    progress(kind)
        gflops = encoder_gflops(min_seconds)
    finally:
        torch.set_num_threads(threads)
    return {
        "label": f"measured on {cpu_model()} ({os.cpu_count()} cores, load average {load:.1f}), "
        f"{datetime.date.today().isoformat()}, by `dinoscale calibrate`",
        "decode": decode,
        "cpu_gflops": gflops,
        # fixed costs come from a sweep, not from here: kept from the shipped table
        "trial_fixed_seconds": budget.TRIAL_FIXED_SECONDS,
        "task_fixed_seconds": budget.TASK_FIXED_SECONDS,
    }


def as_python(cal: dict) -> str:
    """The table as the literal shipped in ``dinoscale/sweep/budget.py``."""
    lines = [f"CALIBRATION_LABEL = {cal['label']!r}", "DECODE = {"]
    for kind, e in cal["decode"].items():
        lines.append(
            f'    "{kind}": {{"seconds": {e["seconds"]:.4g}, "pixels": {e["pixels"]}, "bytes": {e["bytes"]}}},'
        )
    lines += ["}", f"CPU_GFLOPS = {cal['cpu_gflops']:.3g}"]
    return "\n".join(lines)
