"""The registration probe: DINO-Reg's recipe on frozen patch-token grids, ConvexAdam on their PCA.

A registration dataset lists its images in pairs, fixed then moving (CAMUS: ED then ES of one view of one
patient; ``dinoscale.data.camus``), so a split's items ``2k`` and ``2k + 1`` are pair ``k`` (checked: both of
one patient). For each pair, as DINO-Reg (Song et al., MICCAI 2024) does:

1. the fixed and moving patch-token grids, their tokens stacked, reduced jointly by PCA (``torch.pca_lowrank``,
   centred) to ``pca_channels`` channels, so both maps share one basis. ``pca_mask: foreground`` (DINO-Reg's
   ``DINOReg_useMask``): the PCA is fitted on, and projects, only the tokens inside each image's foreground
   (``foreground_mask``: DINO-Reg's threshold / largest component / fill / opening, per 2D slice, on the images
   at the label maps' grid that the task hands the probe, ``SegSplit.images``); tokens outside are 0 (the
   foreground mean);
2. the PCA maps resized (bilinear; trilinear for volumes) to the label maps' shape and scaled by one overall
   standard deviation; ``features: mind`` replaces them by the images' MIND-SSC (``dinoscale.probes.mind``,
   ConvexAdam's own features: the classical baseline), ``dino+mind`` concatenates both (the reference benchmark's
   ACDC setting), the DINO block then scaled to the MIND block's standard deviation;
3. ConvexAdam on them (``dinoscale.probes.convex_adam``: SSD correlation volume, coupled convex optimisation in
   both directions made inverse-consistent, Adam instance optimisation with a diffusion regulariser);
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
from scipy import ndimage
from torch.nn import functional as F

from dinoscale.probes.convex_adam import convex_adam, warp
from dinoscale.probes.mind import DILATION, RADIUS, mind_ssc
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
    inverse_consistency: bool = Field(
        True,
        description="ConvexAdam: the convex step run both ways and made inverse-consistent (convexAdam ic=True)",
    )
    pca_mask: Literal["foreground", "none"] = Field(
        "foreground", description="PCA fitted on the foreground tokens only (DINO-Reg's mask), or on all tokens"
    )
    features: Literal["dino", "mind", "dino+mind"] = Field(
        "dino",
        description="what ConvexAdam matches: the PCA'd patch tokens, the images' MIND-SSC (convexAdam's "
        "features), or both concatenated (the reference benchmark's ACDC setting)",
    )


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


MASK_LEVEL, MASK_PERCENTILE, MASK_OPENING, TOKEN_FILL = 0.05, 97, 5, 0.99  # DINO-Reg's mask constants


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """DINO-Reg's foreground of an image (2D, or a volume's slices (S, H, W) one at a time): intensities scaled
    to [0, 1] by the minimum and the 97th percentile, above 0.05; the largest connected component, its holes
    filled, opened by a 5 x 5 square, the largest component of that."""
    img = np.asarray(image, np.float32)
    if img.ndim == 3:
        return np.stack([foreground_mask(sl) for sl in img])
    lo, hi = float(img.min()), float(np.percentile(img, MASK_PERCENTILE))
    mask = (np.clip(img, lo, hi) - lo) / (hi - lo or 1.0) > MASK_LEVEL
    for step in range(2):
        lab, n = ndimage.label(mask)
        if n == 0:
            return mask
        mask = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
        if step == 0:
            mask = ndimage.binary_opening(ndimage.binary_fill_holes(mask), np.ones((MASK_OPENING,) * 2, bool))
    return mask


def token_mask(mask: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """A foreground mask on the token grid: the tokens whose area lies (99 %) inside it, as DINO-Reg keeps the
    resized mask above 0.99."""
    m = torch.as_tensor(np.asarray(mask, np.float32))[None, None]
    return F.interpolate(m, size=tuple(grid), mode="area")[0, 0].numpy() >= TOKEN_FILL


def pca_maps(fixed: np.ndarray, moving: np.ndarray, channels: int, seed: int, masks=None):
    """Both grids (D, *g) projected on the top ``channels`` principal components of their tokens together.
    ``masks`` (two boolean (*g) token masks): the PCA fitted on and applied to the tokens inside them only, 0
    outside; an image with no more than ``channels`` / 2 foreground tokens (none found, say): all tokens of both."""
    d = fixed.shape[0]
    tokens = [torch.as_tensor(np.asarray(a, np.float32)).reshape(d, -1).T for a in (fixed, moving)]
    keep = [torch.ones(len(t), dtype=torch.bool) for t in tokens]
    if masks is not None and min(int(np.sum(m)) for m in masks) * 2 > channels:
        keep = [torch.as_tensor(np.asarray(m, bool).reshape(-1)) for m in masks]
    both = torch.cat([t[k] for t, k in zip(tokens, keep)])
    q = min(channels, d, both.shape[0])
    torch.manual_seed(seed)
    mean = both.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(both - mean, q=q, center=False)
    out = []
    for t, k, a in zip(tokens, keep, (fixed, moving)):
        proj = torch.zeros(len(t), q)
        proj[k] = (t[k] - mean) @ v
        out.append(proj.T.reshape(q, *a.shape[1:]))
    return out[0], out[1]


def _grid(x: np.ndarray) -> np.ndarray:
    """An item's grid as (D, *spatial): 2D (D, h, w) as is; a volume's slices (S, D, h, w) as (D, S, h, w)."""
    return np.moveaxis(x, 1, 0) if x.ndim == 4 else x


def feature_maps(fixed, moving, images, shape, spec: RegistrationProbeSpec, seed: int, device):
    """The two maps (C, *shape) ConvexAdam matches (``spec.features``), at the label maps' ``shape``."""
    needs_images = spec.features != "dino" or spec.pca_mask == "foreground"
    if needs_images and images is None:
        raise ValueError(
            f"registration: features {spec.features!r} / pca_mask {spec.pca_mask!r} read the pair's images; "
            "none given (the registration task hands them to the probe as SegSplit.images)"
        )
    if needs_images and any(np.shape(i) != tuple(shape) for i in images):
        raise ValueError(f"registration: images of shapes {[np.shape(i) for i in images]}, label maps {shape}")
    maps = []
    if spec.features != "mind":
        grids = [_grid(np.asarray(fixed)), _grid(np.asarray(moving))]
        masks = None
        if spec.pca_mask == "foreground":
            masks = [token_mask(foreground_mask(i), g.shape[1:]) for i, g in zip(images, grids)]
        f, m = pca_maps(*grids, spec.pca_channels, seed, masks)
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        f, m = (F.interpolate(t.to(device)[None], size=shape, mode=mode, align_corners=False)[0] for t in (f, m))
        maps.append((f, m))
    if spec.features != "dino":
        maps.append(tuple(mind_ssc(torch.as_tensor(np.asarray(i, np.float32), device=device)) for i in images))
    if spec.features == "dino+mind":
        target = torch.cat(maps[1]).std()
    else:
        target = torch.ones(())
    if spec.features != "mind":  # the DINO block: unit std alone, the MIND block's std beside it
        f, m = maps[0]
        scale = torch.cat([f, m]).std().clamp_min(1e-6) / target.to(f.device)
        maps[0] = (f / scale, m / scale)
    return torch.cat([p[0] for p in maps]), torch.cat([p[1] for p in maps])


def _device() -> torch.device:
    """The trial's GPU where it has one (a paper sweep's ``gpus_per_trial``), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _align(f: torch.Tensor, m: torch.Tensor, moving_labels: np.ndarray, spec: RegistrationProbeSpec, lam: float):
    """(warped moving labels, displacement (ndim, *S) in label-map voxels): ConvexAdam on a pair's feature maps."""
    disp = convex_adam(
        f,
        m,
        grid_sp=spec.grid_sp,
        disp_hw=spec.disp_hw,
        grid_sp_adam=spec.grid_sp_adam,
        lambda_weight=lam,
        iterations=spec.steps,
        lr=spec.lr,
        ic=spec.inverse_consistency,
    ).cpu()
    return warp_labels(moving_labels, disp, spec.n_classes), disp.numpy()


def register_pair(
    fixed, moving, moving_labels: np.ndarray, spec: RegistrationProbeSpec, lam: float, seed: int, images=None
):
    """(warped moving labels, displacement (ndim, *S) in label-map voxels) of one pair of grids; ``images``: the
    (fixed, moving) images at the label maps' shape (the foreground mask and MIND-SSC read them)."""
    f, m = feature_maps(fixed, moving, images, tuple(np.shape(moving_labels)), spec, seed, _device())
    return _align(f, m, moving_labels, spec, lam)


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


def register_split(split: SegSplit, spec: RegistrationProbeSpec, lams, seed: int, what: str) -> dict:
    """{diffusion weight: the warped moving label map of every pair of a split (n_pairs, *S)}. A pair's feature
    maps (PCA, mask, MIND-SSC) do not depend on the weight: made once, registered with each weight."""
    n = pairs(split, what)
    ims, device = split.images, _device()
    warped: dict = {lam: [] for lam in lams}
    for k in range(n):
        labels = split.y[2 * k + 1]
        images = None if ims is None else (ims[2 * k], ims[2 * k + 1])
        f, m = feature_maps(split.x[2 * k], split.x[2 * k + 1], images, tuple(np.shape(labels)), spec, seed, device)
        for lam in lams:
            warped[lam].append(_align(f, m, labels, spec, lam)[0])
    empty = np.zeros((0, *np.shape(split.y)[1:]), np.int64)
    return {lam: np.stack(w) if w else empty for lam, w in warped.items()}


def fit_registration(spec: RegistrationProbeSpec, train: SegSplit, val: SegSplit, test: SegSplit, seed: int = 0):
    """Each diffusion weight scored on val (warped-label Dice against the fixed labels), test registered with the
    chosen one. The train split is not read: registration optimises each pair on its own."""
    del train
    fixed_val = np.asarray(val.y)[0::2]
    warped = register_split(val, spec, spec.lambda_weights, seed, "val")
    scores = {}
    for lam in spec.lambda_weights:
        d = [mean_dice(w, f, spec.n_classes) for w, f in zip(warped[lam], fixed_val)]
        scores[lam] = float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")
    best = max(scores, key=lambda k: -np.inf if np.isnan(scores[k]) else scores[k])
    selected = {"lambda_weight": best}
    return ProbeResult(
        test_scores=register_split(test, spec, [best], seed, "test")[best],
        val_metric=scores[best],
        selected=selected,
        candidates=len(spec.lambda_weights),
        edges=grid_edges({"lambda_weight": spec.lambda_weights}, selected),
    )


def _features_rule(spec: RegistrationProbeSpec) -> str:
    mind = (
        f"MIND-SSC of the images at the label maps' grid (radius {RADIUS}, dilation {DILATION}: convexAdam's "
        "MINDSSC; 12 channels in 3D, 4 in 2D)"
    )
    if spec.features == "mind":
        return mind + "; the patch tokens unused (the classical ConvexAdam baseline)"
    mask = (
        f"fitted on the tokens inside each image's foreground only, 0 outside (DINO-Reg's mask: intensities "
        f"scaled by the minimum and the {MASK_PERCENTILE}th percentile to [0, 1], > {MASK_LEVEL:g}, largest "
        f"component, holes filled, {MASK_OPENING} x "
        f"{MASK_OPENING} opening, per 2D slice; a token kept where >= {TOKEN_FILL:.0%} of its area is foreground)"
        if spec.pca_mask == "foreground"
        else "fitted on all tokens"
    )
    dino = (
        f"PCA of the fixed + moving patch tokens jointly (torch.pca_lowrank, centred) to {spec.pca_channels} "
        f"channels, {mask}; resized bilinearly to the label maps"
    )
    if spec.features == "dino":
        return dino + "; one overall std scaling"
    return f"{dino}, scaled to the std of the {mind}, concatenated with them (the reference benchmark's ACDC setting)"


def _rules(spec: RegistrationProbeSpec, task: str) -> dict:
    ic = (
        "both ways (fixed -> moving and moving -> fixed correlation volumes) and made inverse-consistent "
        "(convexAdam's inverse_consistency: 15 rounds of u := (u - v(x + u)) / 2 for each field)"
        if spec.inverse_consistency
        else "one way; no inverse-consistency step"
    )
    return {
        "pairs": "a split's items in pairs, fixed then moving (one patient's); the train split is not read",
        "feature maps": _features_rule(spec),
        "optimiser": f"ConvexAdam (dinoscale.probes.convex_adam, 2D / 3D): SSD correlation over +-{spec.disp_hw} "
        f"coarse voxels on a {spec.grid_sp}-px grid, coupled convex optimisation (coupling 0.003 ... 1) {ic}, then "
        f"{spec.steps} Adam steps (lr {spec.lr:g} voxel) on a {spec.grid_sp_adam}-px grid, SSD x 12 + lambda x "
        "diffusion, field box-smoothed 3 x 3-wide",
        "selection": f"lambda in {spec.lambda_weights} chosen on val by the warped labels' mean foreground Dice",
        "init": "the convex step's field; deterministic given the features (PCA seeded by the replicate)",
        "source": "DINO-Reg (Song et al., MICCAI 2024) features and foreground mask; ConvexAdam (Siebert et al. "
        "2021), convexAdam 0.2.0's constants (ic=True); MIND-SSC (Heinrich et al. 2013)",
    }


register_probe(
    ProbeDef(
        "registration",
        RegistrationProbeSpec,
        fit_registration,
        tasks=("registration",),
        input="grid",
        images=True,
        description="PCA of fixed + moving patch tokens, ConvexAdam displacement, warped labels (DINO-Reg)",
        rules=_rules,
    )
)
