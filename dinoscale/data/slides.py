"""Whole-slide images -> the tile-bag layout of the ``wsi-tiles`` adapter, through OpenSlide (optional:
``pip install 'dinoscale[wsi]'`` brings openslide-python and the OpenSlide library as openslide-bin).

Each slide (.svs, .ndpi, .mrxs, .tif, ... anything OpenSlide opens) is cut into a grid of
``tile_size`` px tiles at the pyramid level closest to ``mpp`` microns per pixel (or at ``level``);
tiles that are mostly background (bright and unsaturated glass) are left out; the kept ones are
written as PNG into ``<out>/<slide_id>/tile_<x>_<y>.png`` (x, y: level-0 pixel offsets), next to a
``tiles.csv`` per slide recording the level, its downsample and the tissue fraction of each tile.
A slide that OpenSlide cannot open is an error naming the file. Writing is atomic per slide, so a
rerun skips slides already tiled and an interrupted run leaves no half-filled folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dinoscale.data.dataset import DataError
from dinoscale.data.layout import atomic_dir

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".tif", ".tiff", ".svslide")
TILER_VERSION = "1"


def _openslide():
    try:
        import openslide
    except ImportError as e:  # optional dependency: say how to get it, never fall back silently
        raise DataError(
            "tiling slides needs OpenSlide: pip install 'dinoscale[wsi]' (openslide-python + openslide-bin), "
            "or tile the slides with another tool into <slide_id>/*.png folders"
        ) from e
    return openslide


def tissue_fraction(rgb: np.ndarray, saturation: float = 0.07, brightness: float = 0.86) -> float:
    """Fraction of pixels that look like stained tissue: saturated (max - min over RGB) or dark; glass is
    bright and grey. ``rgb``: (H, W, 3) uint8."""
    x = rgb.astype(np.float32) / 255.0
    sat = x.max(-1) - x.min(-1)
    return float(((sat > saturation) | (x.mean(-1) < brightness)).mean())


def pick_level(slide, mpp: float | None, level: int | None) -> int:
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise DataError(f"level {level} is outside the slide's {slide.level_count} levels")
        return level
    if mpp is None:
        return 0
    base = slide.properties.get("openslide.mpp-x")
    if base is None:
        raise DataError("the slide does not record its resolution (openslide.mpp-x); pass level instead of mpp")
    wanted = mpp / float(base)  # downsample that gives the wanted microns per pixel
    return int(np.argmin([abs(d - wanted) for d in slide.level_downsamples]))


def tile_slide(
    path: str | Path,
    out_dir: str | Path,
    tile_size: int = 224,
    mpp: float | None = None,
    level: int | None = None,
    min_tissue: float = 0.5,
) -> Path:
    """Tile one slide into ``<out_dir>/<slide stem>/``; returns that folder (skipped if already complete)."""
    openslide = _openslide()
    path = Path(path)
    dest = Path(out_dir) / path.stem
    try:
        slide = openslide.OpenSlide(str(path))
    except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
        raise DataError(f"{path}: OpenSlide cannot open this slide ({type(e).__name__}: {e})") from e
    with slide:
        lvl = pick_level(slide, mpp, level)
        down = float(slide.level_downsamples[lvl])
        w, h = slide.level_dimensions[lvl]
        settings = {
            "tiler": TILER_VERSION,
            "tile_size": tile_size,
            "level": lvl,
            "downsample": down,
            "min_tissue": min_tissue,
        }

        def write(tmp: Path) -> None:
            rows = []
            for ty in range(h // tile_size):
                for tx in range(w // tile_size):
                    x0, y0 = int(tx * tile_size * down), int(ty * tile_size * down)  # read_region takes level-0 offsets
                    rgb = np.asarray(slide.read_region((x0, y0), lvl, (tile_size, tile_size)).convert("RGB"))
                    frac = tissue_fraction(rgb)
                    if frac >= min_tissue:
                        name = f"tile_{x0}_{y0}.png"
                        Image.fromarray(rgb).save(tmp / name)
                        rows.append(f"{name},{x0},{y0},{frac:.4f}")
            (tmp / "tiles.csv").write_text("tile,x0,y0,tissue_fraction\n" + "".join(r + "\n" for r in rows))
            (tmp / "tiling.json").write_text(json.dumps({**settings, "slide": str(path), "tiles": len(rows)}, indent=1))

        atomic_dir(dest, write, marker="tiles.csv")
    return dest


def tile_slides(slides: Sequence[str | Path] | str | Path, out_dir: str | Path, **kwargs) -> list[Path]:
    """Tile every slide in a folder (by suffix) or a list; returns the slide folders."""
    if isinstance(slides, (str, Path)) and Path(slides).is_dir():
        slides = sorted(p for p in Path(slides).iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    slides = [Path(s) for s in ([slides] if isinstance(slides, (str, Path)) else slides)]
    if not slides:
        raise DataError(f"no slide files ({', '.join(SLIDE_SUFFIXES)}) to tile")
    return [tile_slide(s, out_dir, **kwargs) for s in slides]
