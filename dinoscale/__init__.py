"""dinoscale: scaling sweeps of vision foundation models (DINOv3 first) on medical imaging."""

__version__ = "0.1.0"
