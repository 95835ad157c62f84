"""Every MLflow tag, param and metric name shared between modules is spelt once, in ``dinoscale/record.py``.

An AST walk over the package: a string literal outside ``record.py`` that equals a recorded name, or has the
form of one (a tag in one of ``record.TAG_NAMESPACES``, a column ending in one of ``record.SUFFIXES``), fails.
The names are read from ``record.py`` itself, so the test grows with it: a new constant there is banned
everywhere else from then on. Docstrings are prose, not names, and are skipped.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dinoscale import record

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinoscale"
RECORD = PACKAGE / "record.py"

# Literals allowed outside record.py: file -> literals (a ``_ci_low`` entry covers ``x_ci_low``), each with why.
ALLOWED: dict[str, set[str]] = {
    # the pre-flight's step names (``PreflightReport.checks``: storage, tracking, weights, data), not run params
    "dinoscale/sweep/preflight.py": {"weights"},
}


def recorded_names() -> dict[str, str]:
    """value -> constant name, for every module-level string constant of record.py that is a *name*.

    Tag values (``"sweep"``, ``"running"``) and folder names are single words; names carry a separator
    (``data.source``, ``tokens_per_image``, ``predictions/test.csv``). Single-word params are listed in
    ``record.WORD_PARAMS`` and checked where they are read as keys (see ``_word_keys``).
    """
    out: dict[str, str] = {}
    for node in ast.parse(RECORD.read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(node, ast.AnnAssign):
            target = node.target
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
            if re.search(r"[._/]", value.value) and not value.value.startswith("_"):
                out[value.value] = target.id
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _is_module_path(text: str) -> bool:
    """``dinoscale.sweep.runner`` names a module (an import path, a logger), not a tag."""
    rel = Path(*text.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def offending(source: str, names: dict[str, str]) -> list[tuple[int, str]]:
    """(line, literal) of each string literal in ``source`` that spells a recorded name."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    namespaces = "|".join(re.escape(n) for n in record.TAG_NAMESPACES)
    form = re.compile(rf"^({namespaces})[a-z0-9_]+(\.[a-z0-9_]*)*$")
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
            continue
        text = node.value
        if text in names or any(text.endswith(s) for s in record.SUFFIXES):
            found.append((node.lineno, text))
        elif form.match(text) and not _is_module_path(text):
            found.append((node.lineno, text))
    found += _word_keys(tree)
    return found


def _word_keys(tree: ast.AST) -> list[tuple[int, str]]:
    """Single-word params (``modality``, ``dataset``, ``weights``) used as a key: ``x["modality"]``,
    ``x.get("modality")`` or ``{"modality": ...}``. A bare word elsewhere (a spec field, a message) is not a name."""
    words, out = set(record.WORD_PARAMS), []
    for node in ast.walk(tree):
        keys: list[ast.AST] = []
        if isinstance(node, ast.Subscript):
            keys = [node.slice]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            keys = node.args[:1]
        elif isinstance(node, ast.Dict):
            keys = [k for k in node.keys if k is not None]
        out += [(k.lineno, k.value) for k in keys if isinstance(k, ast.Constant) and k.value in words]
    return out


# Where single-word params are names: the modules that write a cell run's params and read them back.
WORD_SCOPE = ("dinoscale/analysis/", "dinoscale/sweep/", "dinoscale/tracking.py", "dinoscale/headline.py")


def literals_outside_record() -> list[tuple[str, int, str]]:
    names = recorded_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == RECORD:
            continue
        rel = path.relative_to(ROOT).as_posix()
        hits = offending(path.read_text(), names)
        if not rel.startswith(WORD_SCOPE):
            hits = [(line, text) for line, text in hits if text not in record.WORD_PARAMS]
        found += [(rel, line, text) for line, text in hits if not _allowed(rel, text)]
    return found


def _allowed(rel: str, text: str) -> bool:
    allowed = ALLOWED.get(rel, set())
    return text in allowed or any(s in allowed for s in record.SUFFIXES if text.endswith(s))


def test_the_names_come_from_record_itself():
    names = recorded_names()
    assert names[record.DATA_SOURCE] == "DATA_SOURCE" and names[record.TOKENS_PER_IMAGE] == "TOKENS_PER_IMAGE"
    assert record.ROLE_SWEEP not in names  # a tag value, not a name
    assert set(record.SUFFIXES) == {record.CI_LOW, record.CI_HIGH}


@pytest.mark.parametrize(
    "line",
    [
        'tags = {"data.source": "phantom"}',
        'x = m.get("tokens_per_image")',
        'col = f"{name}_ci_low"',
        'tag = "data.patient_ids_rule"',  # of the form of a data.* tag though not (yet) in record.py
        'runs["modality"]',
    ],
)
def test_the_walk_finds_a_literal_name(line):
    assert offending(line, recorded_names())


@pytest.mark.parametrize(
    "line",
    [
        'import importlib\nimportlib.import_module("dinoscale.sweep.runner")',
        'def f():\n    "data.source is a tag"\n',
        "x = record.DATA_SOURCE",
    ],
)
def test_the_walk_leaves_other_strings(line):
    assert offending(line, recorded_names()) == []


def test_no_recorded_name_is_spelt_outside_record():
    found = literals_outside_record()
    assert found == [], "use the dinoscale.record constant instead of:\n" + "\n".join(
        f"{rel}:{line}: {text!r}" for rel, line, text in found
    )


def test_the_allowlist_is_not_stale():
    """Each allowed literal still exists (drop the entry once its file is converted)."""
    names, stale = recorded_names(), []
    for rel, allowed in ALLOWED.items():
        present = set()
        for _, text in offending((ROOT / rel).read_text(), names):
            present |= {text} | {s for s in record.SUFFIXES if text.endswith(s)}
        stale += [(rel, text) for text in sorted(allowed - present)]
    assert stale == [], stale
