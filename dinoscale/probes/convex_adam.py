"""ConvexAdam (Siebert, Hansen & Heinrich 2021) in 2D and 3D, on any feature maps: the registration probe's optimiser.

The PyPI package ``convexAdam`` 0.2.0 is 3D only (``avg_pool3d`` and ``(H, W, D)`` throughout, MIND-SSC features
built in, SimpleITK and nibabel required); CAMUS is 2D. This module is the same scheme, written once for both:

1. both feature maps average-pooled by ``grid_sp`` (the coarse grid);
2. an SSD correlation volume over every integer displacement within +-``disp_hw`` coarse voxels (each cost map
   smoothed by two 3-wide box filters, as the package does);
3. coupled convex optimisation: the arg-min displacement, box-smoothed, then six rounds of arg-min of
   cost + coeff * |d - smoothed field|^2 with coeff 0.003 ... 1 (the package's schedule);
3b. inverse consistency (``ic=True``, the package's default): the same convex step from the reversed correlation
   volume (moving -> fixed) gives the backward field; both coarse fields are then made inverse-consistent by the
   package's iterative scheme (``inverse_consistency``, 15 rounds): each field := 0.5 x (itself - the other field
   sampled at x + itself), so that u_fwd(x) + u_bwd(x + u_fwd(x)) shrinks towards 0; the forward field goes on;
4. Adam instance optimisation of the field on the ``grid_sp_adam`` grid, initialised by step 3: feature SSD after
   warping (channel mean x 12, as the package) plus ``lambda_weight`` x the diffusion regulariser (squared forward differences), the field smoothed
   by three 3-wide box filters (the package's B-spline-like smoothing) before each warp, lr 1 voxel, ``iterations``
   steps; upsampled (bi/trilinear) to full resolution.

Not reproduced: fp16 on GPU; and in the inverse-consistency step the package samples with ``grid_sample``'s zero
padding, here the border value (as every warp of this module). Displacements are in voxels of the
full-resolution maps, axis order of the arrays: ``warp(moving, disp)(x) = moving(x + disp(x))``, which the
optimiser makes close to ``fixed(x)``.
"""

from __future__ import annotations

import itertools

import torch
from torch.nn import functional as F

COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # convexAdam's coupled_convex schedule
SSD_SCALE = 12.0  # convexAdam weighs the channel-mean SSD x 12 against lambda x the diffusion term
IC_ITERATIONS = 15  # convexAdam's convex_adam_pt calls inverse_consistency(..., iter=15)


def _box(x: torch.Tensor, k: int = 3, times: int = 1) -> torch.Tensor:
    """A ``k``-wide box filter (stride 1, zero-padded as the package does), ``times`` over; 2D or 3D maps."""
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    for _ in range(times):
        x = pool(x, k, stride=1, padding=k // 2)
    return x


def _pool(x: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 1:
        return x
    return (F.avg_pool2d if x.ndim == 4 else F.avg_pool3d)(x, k, stride=k)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False)


def warp(x: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``x`` (N, C, *S) sampled at ``identity + disp``; ``disp`` (N, ndim, *S) in voxels, the arrays' axis order.
    Outside the map: the border value."""
    shape = x.shape[2:]
    axes = [torch.arange(n, dtype=x.dtype, device=x.device) for n in shape]
    ident = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (ndim, *S)
    pos = ident.unsqueeze(0) + disp.to(x.dtype)
    norm = torch.stack([2 * pos[:, i] / max(n - 1, 1) - 1 for i, n in enumerate(shape)], dim=-1)
    return F.grid_sample(x, norm.flip(-1), mode=mode, padding_mode="border", align_corners=True)


def correlate(fix: torch.Tensor, mov: torch.Tensor, disp_hw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD cost (K, *s) of every integer displacement within +-``disp_hw`` (``offsets`` (K, ndim)) on the coarse
    grid; ``fix`` / ``mov`` (1, C, *s)."""
    nd = fix.ndim - 2
    pad = F.pad(mov, (disp_hw,) * (2 * nd), mode="replicate")
    shape = fix.shape[2:]
    offsets = list(itertools.product(range(-disp_hw, disp_hw + 1), repeat=nd))
    costs = []
    for off in offsets:
        sl = tuple(slice(disp_hw + o, disp_hw + o + n) for o, n in zip(off, shape))
        costs.append((fix - pad[(slice(None), slice(None), *sl)]).pow(2).mean(1))
    cost = _box(torch.cat(costs).unsqueeze(1), 3, times=2).squeeze(1)
    return cost, torch.tensor(offsets, dtype=fix.dtype, device=fix.device)


def coupled_convex(cost: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The smooth field (1, ndim, *s) of the coupled convex optimisation over a correlation volume."""
    shape = cost.shape[1:]

    def field(idx: torch.Tensor) -> torch.Tensor:
        return _box(offsets[idx.reshape(-1)].T.reshape(1, -1, *shape), 3)

    smooth = field(cost.argmin(0))
    for coeff in COUPLING:
        penalty = (offsets.view(-1, offsets.shape[1], *[1] * len(shape)) - smooth).pow(2).sum(1)
        smooth = field((cost + coeff * penalty).argmin(0))
    return smooth


def inverse_consistency(fwd: torch.Tensor, bwd: torch.Tensor, iterations: int = IC_ITERATIONS):
    """Two fields (1, ndim, *s) in voxels made inverse-consistent (convexAdam's ``inverse_consistency``): each
    round, both from the previous round's pair, ``fwd := 0.5 (fwd - warp(bwd, fwd))`` and ``bwd := 0.5 (bwd -
    warp(fwd, bwd))``. A pair already inverse-consistent (``bwd(x + fwd(x)) = -fwd(x)``) is a fixed point."""
    for _ in range(iterations):
        fwd, bwd = 0.5 * (fwd - warp(bwd, fwd)), 0.5 * (bwd - warp(fwd, bwd))
    return fwd, bwd


def inconsistency(fwd: torch.Tensor, bwd: torch.Tensor) -> float:
    """Mean |fwd(x) + bwd(x + fwd(x))| (voxels): 0 for a pair of fields inverse to each other."""
    return float((fwd + warp(bwd, fwd)).norm(dim=1).mean())


def convex_step(fix: torch.Tensor, mov: torch.Tensor, grid_sp: int, disp_hw: int, ic: bool = True):
    """The coupled convex step on the coarse grid: (forward, backward) fields (1, ndim, *s) in coarse voxels,
    made inverse-consistent where ``ic`` (backward None otherwise); ``fix`` / ``mov`` (1, C, *S)."""
    fix_c, mov_c = _pool(fix, grid_sp), _pool(mov, grid_sp)
    cost, offsets = correlate(fix_c, mov_c, disp_hw)
    fwd = coupled_convex(cost, offsets)
    if not ic:
        return fwd, None
    bwd = coupled_convex(correlate(mov_c, fix_c, disp_hw)[0], offsets)
    return inverse_consistency(fwd, bwd)


def _diffusion(d: torch.Tensor) -> torch.Tensor:
    nd = d.ndim - 2
    return sum(torch.diff(d, dim=2 + i).pow(2).mean() for i in range(nd))


def convex_adam(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    grid_sp: int = 4,
    disp_hw: int = 4,
    grid_sp_adam: int = 2,
    lambda_weight: float = 1.25,
    iterations: int = 80,
    lr: float = 1.0,
    ic: bool = True,
) -> torch.Tensor:
    """The displacement (ndim, *S) in voxels taking ``moving`` (C, *S) onto ``fixed`` (C, *S), 2D or 3D feature
    maps of one shape: ``warp(moving, disp) ~ fixed``. ``ic``: the convex step made inverse-consistent."""
    fix, mov = fixed.float().unsqueeze(0), moving.float().unsqueeze(0)
    shape = fix.shape[2:]
    with torch.no_grad():
        coarse = convex_step(fix, mov, grid_sp, disp_hw, ic)[0] * grid_sp  # full-resolution voxels
        fix_a, mov_a = _pool(fix, grid_sp_adam), _pool(mov, grid_sp_adam)
        start = _resize(coarse, fix_a.shape[2:]) / grid_sp_adam  # Adam-grid voxels
    if iterations <= 0 or lambda_weight <= 0:  # the package skips instance optimisation at lambda 0
        return _resize(coarse, shape)[0]
    param = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([param], lr=lr)
    with torch.enable_grad():  # also under a caller's no_grad
        for _ in range(iterations):
            opt.zero_grad()
            d = _box(param, 3, times=3)
            loss = (warp(mov_a, d) - fix_a).pow(2).mean() * SSD_SCALE + lambda_weight * _diffusion(d)
            loss.backward()
            opt.step()
    with torch.no_grad():
        d = _box(param, 3, times=3) * grid_sp_adam
        return _resize(d, shape)[0]
