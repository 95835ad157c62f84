"""Whole-slide tiling through OpenSlide on a real tiled TIFF slide written to disk, into the layout the
``wsi-tiles`` adapter reads."""

import numpy as np
import pytest
import tifffile  # dev dependencies (pyproject [dev]): a missing one fails here, never skips
from typer.testing import CliRunner

from dinoscale.data import DataError


def _slide(path, tissue_boxes, size=(512, 768)):
    img = np.full((*size, 3), 242, np.uint8)  # bright, grey glass
    for y0, y1, x0, x1 in tissue_boxes:
        img[y0:y1, x0:x1] = (175, 90, 165)  # H&E-like pink / purple
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib")
    return path


def test_slides_are_tiled_into_tissue_tiles_the_adapter_reads(tmp_path):
    from dinoscale.data.adapters import prepare_wsi_tiles
    from dinoscale.data.slides import tile_slides
    from dinoscale.spec import DatasetSpec

    slides = tmp_path / "slides"
    slides.mkdir()
    _slide(slides / "S1.tif", [(0, 128, 0, 256)])  # tissue covers 2 of the 12 128-px tiles of a 512 x 768 slide
    _slide(slides / "S2.tif", [(128, 384, 256, 512)])  # 4 tiles
    out = tmp_path / "bags"
    folders = tile_slides(slides, out, tile_size=128)
    counts = {f.name: len(list(f.glob("tile_*.png"))) for f in folders}
    assert counts == {"S1": 2, "S2": 4}
    assert sorted(p.name for p in (out / "S2").glob("tile_*.png")) == [
        "tile_256_128.png",
        "tile_256_256.png",
        "tile_384_128.png",
        "tile_384_256.png",
    ]  # level-0 x_y offsets
    mtime = (out / "S1" / "tiles.csv").stat().st_mtime_ns
    tile_slides(slides, out, tile_size=128)  # a rerun leaves finished slides alone
    assert (out / "S1" / "tiles.csv").stat().st_mtime_ns == mtime

    (out / "slides.csv").write_text("slide_id,label,patient_id\nS1,normal,P1\nS2,tumor,P2\n")
    ds = prepare_wsi_tiles(DatasetSpec(name="wsi-tiles", root=str(out)), tmp_path)  # the adapter itself: 2 slides
    assert ds.task == "mil" and ds.manifest.groupby("bag_id").size().to_dict() == {"S1": 2, "S2": 4}


def test_an_unreadable_slide_is_named_and_the_cli_exits_2(tmp_path):
    import openslide  # noqa: F401  (the tiler's optional dependency is installed for the tests)

    from dinoscale.cli import app
    from dinoscale.data.slides import tile_slide

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    with pytest.raises(DataError, match=r"broken\.svs: OpenSlide cannot open this slide"):
        tile_slide(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "broken").exists()
    res = CliRunner().invoke(app, ["tile-slides", str(bad), str(tmp_path / "out")])
    assert res.exit_code == 2 and "broken.svs" in res.output
