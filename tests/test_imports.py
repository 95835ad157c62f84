"""Imports at module level, unless import time was measured to matter (issue 24).

A function-level import is allowed only where it keeps a measured-slow or optional library off a path that
does not need it: the library itself, or a dinoscale module whose own module-level imports reach one. The
measured figures (a fresh `python -c "import X"` on this project's CI machine, 2 cores, wall seconds, Python
start-up ~0.05 s included) live here, in one place, instead of in a comment at each import:

    monai 10.2   peft 6.8   timm 4.9   torch 2.2   mlflow 1.8   sklearn 1.5   scipy 1.0   transformers 0.9
    matplotlib 0.6   ray 0.55   pandas 0.5   nibabel 0.37   optuna 0.3   pydicom 0.29

against numpy 0.13, h5py 0.14, fsspec 0.14, typer 0.08, pydantic 0.07, yaml 0.04, PIL 0.05, rich 0.03 (not
worth deferring). Ray workers pay these on every start (issue 31), and `dinoscale --help` / a refused choice
answer before torch is imported (tests/test_cli_conventions.py). Optional packages (OpenSlide, open_clip, a
family's own package, the cluster clients) are imported where they are used, so that a machine without them
runs everything else. ``dinoscale/cli.py`` is the front door: it imports what each command needs when the
command runs, and is measured by the CLI tests instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinoscale"
SLOW = {
    "monai", "peft", "timm", "torch", "torchvision", "mlflow", "sklearn", "scipy", "transformers", "matplotlib",
    "ray", "pandas", "nibabel", "optuna", "pydicom",
}  # fmt: skip
OPTIONAL = {"openslide", "open_clip", "conch", "lighter_zoo", "requests", "jsonschema", "boto3", "google", "kubernetes"}
FRONT_DOOR = {"dinoscale.cli"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """module -> (its module-level targets, its function-level imports as (line, target))."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        inner = {
            id(k)
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            for k in ast.walk(n)
            if isinstance(k, (ast.Import, ast.ImportFrom))
        }
        top, lazy = set(), []
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and getattr(n, "level", 0) == 0:
                names = [n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
                if isinstance(n, ast.ImportFrom):  # `from dinoscale import record`: the submodule
                    names += [f"{n.module}.{a.name}" for a in n.names]
                if id(n) in inner:
                    lazy += [(n.lineno, x) for x in names[:1]] + [(n.lineno, x) for x in names[1:]]
                else:
                    top |= set(names)
        out[_module(path)] = (top, lazy)
    return out


def test_function_level_imports_only_defer_what_was_measured_to_matter():
    graph = _imports()
    memo: dict[str, bool] = {}

    def slow(name: str, seen: tuple = ()) -> bool:
        root = name.split(".")[0]
        if root in SLOW or root in OPTIONAL:
            return True
        if name not in graph or name in seen:
            return False
        if name not in memo:
            parent = name.rsplit(".", 1)[0]
            memo[name] = any(slow(t, (*seen, name)) for t in graph[name][0] | ({parent} if parent in graph else set()))
        return memo[name]

    found = []
    for module, (_, lazy) in sorted(graph.items()):
        if module in FRONT_DOOR:
            continue
        by_line: dict[int, list[str]] = {}
        for line, target in lazy:
            by_line.setdefault(line, []).append(target)
        for line, targets in sorted(by_line.items()):
            if not any(slow(t) for t in targets):
                found.append(f"{module}:{line}: {targets[0]}")
    assert found == [], "import these at module level (not measured to matter):\n" + "\n".join(found)
