"""The shape of the package: no import circles, and a probe is added from one file.

The import graph is read from the source with the standard library's ``ast`` (every ``import``,
module-level, inside a function or under ``if TYPE_CHECKING``), so a lazy import or a type-only import
that closes a circle counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinoscale"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """dinoscale modules imported by ``module`` (``from a import b`` counts ``a.b`` when that is a module)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dinoscale")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] == "dinoscale":
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(module)
    return {m for m in out if m in known}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", known) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strong(v)
    return found


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dinoscale.x import y\ndef f():\n    import dinoscale.z\n"
    )
    # a type-only import is an edge too: a circle through TYPE_CHECKING is still a circle of the design
    assert _imports(tree, "dinoscale.m", False, {"dinoscale.x", "dinoscale.x.y", "dinoscale.z"}) == {
        "dinoscale.x.y",
        "dinoscale.z",
    }


def test_no_import_circles_in_the_package():
    graph = import_graph()
    assert len(graph) > 40 and "dinoscale.sweep.plan" in graph["dinoscale.sweep.runner"]  # the graph is real
    assert cycles(graph) == []


def test_leaf_modules_import_nothing_of_dinoscale():
    """The registries and the record schema are leaves: anyone may import them without a circle."""
    graph = import_graph()
    for leaf in (
        "dinoscale.record",
        "dinoscale.probes.registry",
        "dinoscale.strategies.registry",
        "dinoscale.models.families",
        "dinoscale.features.recipe",
        "dinoscale.console",
        "dinoscale.datasettings",
    ):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    assert graph["dinoscale.provenance"] == {"dinoscale.record"}


def test_the_spec_reads_the_data_package_and_never_the_reverse():
    """spec.py validates datasets against data/'s registry; data/ reads the types it needs from the leaf
    ``datasettings`` (PhantomSpec, DatasetSettings), not from the spec, even for type checking."""
    graph = import_graph()
    back = {m: graph[m] & {"dinoscale.spec"} for m in graph if m == "dinoscale.data" or m.startswith("dinoscale.data.")}
    assert {m: e for m, e in back.items() if e} == {}
    assert any(m.startswith("dinoscale.data") for m in graph["dinoscale.spec"])  # the forward arrow is real


def test_trials_do_not_import_the_plan_or_the_spec():
    """Trials consume resolved cells: they neither re-plan nor re-validate the spec."""
    graph = import_graph()
    assert "dinoscale.sweep.plan" not in graph["dinoscale.sweep.trial"]
    assert "dinoscale.spec" not in graph["dinoscale.sweep.trial"]


def test_only_the_data_package_reads_manifest_columns():
    """Datasets own their shape: no module outside dinoscale.data names the manifest's shape columns."""
    from dinoscale.data.dataset import EXTRA_COLUMNS

    offenders = []
    for p in PACKAGE.rglob("*.py"):
        if p.parent.name == "data":
            continue
        strings = {
            n.value
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        offenders += [f"{p.relative_to(ROOT)}: '{c}'" for c in EXTRA_COLUMNS if c in strings]
    assert offenders == []


THROWAWAY_PROBE = textwrap.dedent('''
    """A throw-away probe, written by a test in one file: a nearest-class-mean classifier."""
    from typing import Literal

    import numpy as np
    from pydantic import Field

    from dinoscale.probes.registry import ProbeDef, ProbeResult, ProbeSpecBase, Split, register_probe


    class CentroidSpec(ProbeSpecBase):
        kind: Literal["centroid"] = "centroid"
        temperature: float = Field(1.0, gt=0)


    def fit(spec, train: Split, val: Split, test: Split, seed: int = 0) -> ProbeResult:
        from dinoscale.metrics import macro_auroc

        mu, sd = train.x.mean(0), train.x.std(0) + 1e-6
        z = lambda x: (x - mu) / sd  # noqa: E731
        pos = np.stack([z(train.x)[train.y[:, j] > 0].mean(0) for j in range(train.y.shape[1])])
        neg = np.stack([z(train.x)[train.y[:, j] == 0].mean(0) for j in range(train.y.shape[1])])
        score = lambda x: 1 / (1 + np.exp(-((z(x) @ (pos - neg).T) / spec.temperature)))  # noqa: E731
        return ProbeResult(score(test.x), macro_auroc(val.y, score(val.x)), {"temperature": spec.temperature}, 1)


    register_probe(ProbeDef("centroid", CentroidSpec, fit, tasks=("multilabel", "multiclass"), input="vector"))
''')


@pytest.mark.slow
def test_a_probe_added_from_one_file_runs_in_a_sweep(tmp_path, monkeypatch):
    """The whole cost of a new probe: one module (found through DINOSCALE_PLUGINS here; inside the package,
    by being in dinoscale/probes/). The spec validates it, the plan gives it a view, Ray Tune runs it,
    MLflow records it, the analysis reports it."""
    import ray

    from conftest import tiny_spec_dict
    from dinoscale.probes import registry
    from dinoscale.spec import parse_spec
    from dinoscale.sweep.runner import run_sweep

    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "throwaway_centroid.py").write_text(THROWAWAY_PROBE)
    # Ray workers inherit the driver's environment: both variables reach the trial that imports the probe
    monkeypatch.setenv("PYTHONPATH", f"{plugin_dir}:{ROOT}")
    monkeypatch.setenv("DINOSCALE_PLUGINS", "throwaway_centroid")
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setattr(registry, "_LOADED", False)  # discover again, now with the plugin
    ray.shutdown()  # a fresh embedded Ray, started with the variables above
    raw = tiny_spec_dict(
        tmp_path,
        probes=[{"kind": "centroid", "temperature": 0.5}],
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        resolutions=[32],
    )
    try:
        out = run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True)
    finally:
        ray.shutdown()
        monkeypatch.undo()
        registry._PROBES.pop("centroid", None)
        sys.modules.pop("throwaway_centroid", None)
    assert [r["probe"] for r in out.rows] == ["centroid"] and out.rows[0]["state"] == "FINISHED"
    assert 0 <= out.rows[0]["metric_ci_low"] <= out.rows[0]["metric"] <= out.rows[0]["metric_ci_high"] <= 1
    from mlflow.tracking import MlflowClient

    run = MlflowClient(out.tracking_uri).get_run(out.rows[0]["mlflow_run_id"])
    assert run.data.params["probe"] == "centroid" and run.data.params["probe.temperature"] == "0.5"
    assert (out.report_dir / "report.md").is_file()
