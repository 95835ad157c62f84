"""CT window presets as data: (level, width) in Hounsfield units, the usual radiology reading windows.

A window maps [level - width/2, level + width/2] HU to [0, 1] (clipped). Every value is logged with
the run (the paper leaves CT windowing unstated).
"""

from __future__ import annotations

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),  # parenchyma, nodules, emphysema: [-1350, 150] HU
    "mediastinum": (50.0, 350.0),  # vessels, nodes, effusion: [-125, 225] HU
    "bone": (400.0, 1800.0),  # cortical and trabecular bone: [-500, 1300] HU
    "brain": (40.0, 80.0),  # grey/white matter: [0, 80] HU
    "abdomen": (40.0, 400.0),  # soft-tissue organs: [-160, 240] HU
}


def window_range(window: str | tuple[float, float] | list[float]) -> tuple[float, float]:
    """(HU min, HU max) of a preset name or an explicit range."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise KeyError(f"unknown CT window preset '{window}'; known: {', '.join(sorted(CT_WINDOWS))}")
        level, width = CT_WINDOWS[window]
        return level - width / 2, level + width / 2
    lo, hi = (float(x) for x in window)
    if not lo < hi:
        raise ValueError(f"CT window needs HU min < HU max, got [{lo}, {hi}]")
    return lo, hi
