"""dinoscale: scaling sweeps of vision foundation models (DINOv3 first) on medical imaging.

The Python entry points, for a notebook (README, "Python")::

    from dinoscale import load_spec, run_sweep, results, write_report, analyze_sweep

    out = run_sweep(load_spec("sweeps/demo/xray.yaml"))  # what `dinoscale sweep` runs
    df = results("sweeps/demo/xray.yaml")  # the spec's latest sweep, one row per cell run
    write_report(df[df.probe == "linear"], "reports/linear-only")  # the analysis, again, on any part of it
"""

import importlib

__version__ = "0.1.0"

# name -> (module, attribute). Imported on first use (PEP 562): `import dinoscale` stays instant for the CLI,
# where validating a spec or starting a sweep imports torch, timm and Ray (seconds).
_API = {
    "load_spec": ("dinoscale.spec", "load_spec"),
    "run_sweep": ("dinoscale.sweep.runner", "run_sweep"),
    "results": ("dinoscale.analysis", "sweep_results"),
    "results_from_csv": ("dinoscale.analysis", "results_from_csv"),
    "write_report": ("dinoscale.analysis", "write_report"),
    "analyze_sweep": ("dinoscale.analysis", "analyze_sweep"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'dinoscale' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
