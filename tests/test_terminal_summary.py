"""The end of a sweep fits one screen: the xray demo's 32 cells print as a size x resolution grid per
probe (not 32 table rows), and a failed cell is still named."""

from dinoscale.console import console
from dinoscale.headline import AUROC
from dinoscale.sweep.display import print_summary

SIZES = {"dinov3-demo-xs": 409_728, "dinov3-demo-s": 1_113_984, "dinov3-demo-m": 2_817_024, "dinov3-demo-l": 6_514_688}


def _rows(failed: str | None = None) -> list[dict]:
    rows = []
    for probe in ("linear", "knn"):
        for backbone, n in SIZES.items():
            for res in (64, 96, 128, 224):
                m = 0.6 + n / 2e7 + res / 2000
                cell = f"{backbone}_r{res}_{probe}_frozen_s0"
                rows.append(
                    {
                        "cell": cell,
                        "backbone": backbone,
                        "n_params": n,
                        "resolution": res,
                        "probe": probe,
                        "strategy": "frozen",
                        "seed": 0,
                        "state": "FAILED" if cell == failed else "FINISHED",
                        "metric": m,
                        "metric_ci_low": m - 0.04,
                        "metric_ci_high": m + 0.04,
                        "val_metric": m - 0.01,
                        "selected": "lr=0.1, weight_decay=0",
                    }
                )
    return rows


def test_the_demo_summary_is_a_grid_that_fits_one_screen():
    rows = _rows(failed="dinov3-demo-m_r96_knn_frozen_s0")
    with console.capture() as cap:
        print_summary(rows, "xray-demo: test macro AUROC", AUROC)
    lines = cap.get().splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    text = "\n".join(lines)
    for r in rows:
        if r["state"] == "FINISHED":
            assert f"{r['metric']:.3f} [{r['metric_ci_low']:.3f}, {r['metric_ci_high']:.3f}]" in text
    assert "FAILED: backbone=dinov3-demo-m, n_params=2.82M, resolution=96, probe=knn" in text
    header = next(line for line in lines if "64px" in line)
    assert header.index("64px") < header.index("96px") < header.index("128px") < header.index("224px")


def test_a_small_sweep_keeps_one_row_per_cell():
    rows = [r for r in _rows() if r["probe"] == "linear" and r["resolution"] in (64, 224)][:8]
    with console.capture() as cap:
        print_summary(rows, "small", AUROC)
    assert cap.get().count("lr=0.1, weight_decay=0") == 8
