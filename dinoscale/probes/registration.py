"""The registration probe: DINO-Reg's recipe on frozen patch-token grids, ConvexAdam on their PCA.

A registration dataset lists its images in pairs, fixed then moving (CAMUS: ED then ES of one view of one
patient; ``dinoscale.data.camus``), so a split's items ``2k`` and ``2k + 1`` are pair ``k`` (checked: both of
one patient). For each pair, as DINO-Reg (Song et al., MICCAI 2024) does:

1. the fixed and moving patch-token grids, their tokens stacked, reduced jointly by PCA (``torch.pca_lowrank``,
   centred) to ``pca_channels`` channels, so both maps share one basis;
2. the PCA maps resized (bilinear; trilinear for volumes) to the label maps' shape and scaled by one overall
   standard deviation;
3. ConvexAdam on them (``dinoscale.probes.convex_adam``: SSD correlation volume, coupled convex optimisation,
   Adam instance optimisation with a diffusion regulariser);
4. the moving label map warped by the displacement (one-hot maps warped bilinearly, arg-max).

Nothing is trained: the train split is not read. The diffusion weight is chosen on val by the warped labels'
mean foreground Dice (``lambda_weights``: one value is the protocol's, several a grid); test is registered once.
The probe's test output is the warped moving label map of each pair; the registration task scores it against
the fixed label map, beside the identity transform (``dinoscale.tasks``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch.nn import functional as F

from dinoscale.probes.convex_adam import convex_adam, warp
from dinoscale.probes.registry import ProbeDef, ProbeResult, ProbeSpecBase, SegSplit, grid_edges, register_probe


class RegistrationProbeSpec(ProbeSpecBase):
    """PCA of the fixed + moving patch tokens, then ConvexAdam on the PCA maps (DINO-Reg)."""

    kind: Literal["registration"] = "registration"
    n_classes: int = Field(4, ge=2, description="label values of the label maps, background included")
    pca_channels: int = Field(24, ge=1, description="PCA channels of the joint fixed + moving tokens (DINO-Reg: 24)")
    grid_sp: int = Field(4, ge=1, description="ConvexAdam: coarse grid spacing of the correlation volume (px)")
    disp_hw: int = Field(4, ge=1, description="ConvexAdam: search radius of the correlation volume (coarse voxels)")
    grid_sp_adam: int = Field(2, ge=1, description="ConvexAdam: grid spacing of the Adam instance optimisation (px)")
    lambda_weights: list[float] = Field(
        default_factory=lambda: [1.25], min_length=1, description="diffusion weights (convexAdam: 1.25), chosen on val"
    )
    steps: int = Field(80, ge=0, description="Adam instance-optimisation steps (convexAdam: 80)")
    lr: float = Field(1.0, gt=0, description="Adam learning rate, in voxels of the Adam grid (convexAdam: 1)")


def pairs(split: SegSplit, what: str) -> int:
    """The number of (fixed, moving) pairs of a split whose items come as fixed, moving, fixed, moving, ..."""
    n = len(split.x)
    if n % 2:
        raise ValueError(f"{what}: {n} items; a registration split lists (fixed, moving) pairs, an even count")
    ids = split.volume_ids
    if ids is not None and any(str(ids[2 * k]) != str(ids[2 * k + 1]) for k in range(n // 2)):
        k = next(k for k in range(n // 2) if str(ids[2 * k]) != str(ids[2 * k + 1]))
        raise ValueError(f"{what}: pair {k} joins patients {ids[2 * k]} and {ids[2 * k + 1]}; pairs are one patient's")
    return n // 2


def pca_maps(fixed: np.ndarray, moving: np.ndarray, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both grids (D, *g) projected on the top ``channels`` principal components of their tokens together."""
    d = fixed.shape[0]
    tokens = torch.cat([torch.as_tensor(np.asarray(a, np.float32)).reshape(d, -1).T for a in (fixed, moving)])
    q = min(channels, d, tokens.shape[0])
    torch.manual_seed(seed)
    mean = tokens.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(tokens - mean, q=q, center=False)
    proj = ((tokens - mean) @ v).T  # (q, 2 * tokens)
    half = proj.shape[1] // 2
    return proj[:, :half].reshape(q, *fixed.shape[1:]), proj[:, half:].reshape(q, *moving.shape[1:])


def _grid(x: np.ndarray) -> np.ndarray:
    """An item's grid as (D, *spatial): 2D (D, h, w) as is; a volume's slices (S, D, h, w) as (D, S, h, w)."""
    return np.moveaxis(x, 1, 0) if x.ndim == 4 else x


def register_pair(fixed, moving, moving_labels: np.ndarray, spec: RegistrationProbeSpec, lam: float, seed: int):
    """(warped moving labels, displacement (ndim, *S) in label-map voxels) of one pair of grids. On the trial's GPU
    where it has one (a paper sweep's ``gpus_per_trial``), else the CPU."""
    shape = moving_labels.shape
    f, m = pca_maps(_grid(np.asarray(fixed)), _grid(np.asarray(moving)), spec.pca_channels, seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    f, m = f.to(device), m.to(device)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    f, m = (F.interpolate(t[None], size=shape, mode=mode, align_corners=False)[0] for t in (f, m))
    scale = torch.cat([f, m]).std().clamp_min(1e-6)
    disp = convex_adam(
        f / scale,
        m / scale,
        grid_sp=spec.grid_sp,
        disp_hw=spec.disp_hw,
        grid_sp_adam=spec.grid_sp_adam,
        lambda_weight=lam,
        iterations=spec.steps,
        lr=spec.lr,
    )
    disp = disp.cpu()
    return warp_labels(moving_labels, disp, spec.n_classes), disp.numpy()


def warp_labels(labels: np.ndarray, disp: torch.Tensor, n_classes: int) -> np.ndarray:
    """A label map warped by ``disp`` (voxels): its one-hot maps warped bilinearly, then the arg-max."""
    onehot = F.one_hot(torch.as_tensor(np.asarray(labels, np.int64)), n_classes).movedim(-1, 0).float()
    with torch.no_grad():
        return warp(onehot[None], torch.as_tensor(disp)[None]).argmax(1)[0].numpy().astype(np.int64)


def mean_dice(pred: np.ndarray, target: np.ndarray, n_classes: int) -> float:
    """Mean Dice over the structures the target holds (the selection value on val)."""
    values = []
    for c in range(1, n_classes):
        t, p = target == c, pred == c
        if t.any():
            values.append(2 * (t & p).sum() / (t.sum() + p.sum()))
    return float(np.mean(values)) if values else float("nan")


def register_split(split: SegSplit, spec: RegistrationProbeSpec, lam: float, seed: int, what: str) -> np.ndarray:
    """The warped moving label map of every pair of a split (n_pairs, *S)."""
    n = pairs(split, what)
    out = [register_pair(split.x[2 * k], split.x[2 * k + 1], split.y[2 * k + 1], spec, lam, seed)[0] for k in range(n)]
    return np.stack(out) if out else np.zeros((0, *np.shape(split.y)[1:]), np.int64)


def fit_registration(spec: RegistrationProbeSpec, train: SegSplit, val: SegSplit, test: SegSplit, seed: int = 0):
    """Each diffusion weight scored on val (warped-label Dice against the fixed labels), test registered with the
    chosen one. The train split is not read: registration optimises each pair on its own."""
    del train
    n_val = pairs(val, "val")
    fixed_val = np.asarray(val.y)[0::2]
    scores = {}
    for lam in spec.lambda_weights:
        warped = register_split(val, spec, lam, seed, "val") if n_val else np.zeros((0,))
        d = [mean_dice(w, f, spec.n_classes) for w, f in zip(warped, fixed_val)]
        scores[lam] = float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")
    best = max(scores, key=lambda k: -np.inf if np.isnan(scores[k]) else scores[k])
    selected = {"lambda_weight": best}
    return ProbeResult(
        test_scores=register_split(test, spec, best, seed, "test"),
        val_metric=scores[best],
        selected=selected,
        candidates=len(spec.lambda_weights),
        edges=grid_edges({"lambda_weight": spec.lambda_weights}, selected),
    )


def _rules(spec: RegistrationProbeSpec, task: str) -> dict:
    return {
        "pairs": "a split's items in pairs, fixed then moving (one patient's); the train split is not read",
        "features": f"PCA of the fixed + moving patch tokens jointly (torch.pca_lowrank, centred) to "
        f"{spec.pca_channels} channels; resized bilinearly to the label maps; one overall std scaling",
        "optimiser": f"ConvexAdam (dinoscale.probes.convex_adam, 2D / 3D): SSD correlation over +-{spec.disp_hw} "
        f"coarse voxels on a {spec.grid_sp}-px grid, coupled convex optimisation (coupling 0.003 ... 1), then "
        f"{spec.steps} Adam steps (lr {spec.lr:g} voxel) on a {spec.grid_sp_adam}-px grid, SSD x 12 + lambda x "
        "diffusion, field box-smoothed 3 x 3-wide; no inverse-consistency step",
        "selection": f"lambda in {spec.lambda_weights} chosen on val by the warped labels' mean foreground Dice",
        "init": "the convex step's field; deterministic given the features (PCA seeded by the replicate)",
        "source": "DINO-Reg (Song et al., MICCAI 2024) features; ConvexAdam (Siebert et al. 2021), "
        "convexAdam 0.2.0's constants",
    }


register_probe(
    ProbeDef(
        "registration",
        RegistrationProbeSpec,
        fit_registration,
        tasks=("registration",),
        input="grid",
        description="PCA of fixed + moving patch tokens, ConvexAdam displacement, warped labels (DINO-Reg)",
        rules=_rules,
    )
)
