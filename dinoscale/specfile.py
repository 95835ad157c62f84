"""A spec file as data, before validation: its ``extends`` chain merged, then the ``--set`` overrides applied.

``extends: base.yaml`` (a path relative to the spec's own folder) makes a spec an overlay of another:
mappings merge key by key (the overlay wins, at any depth), a list or a scalar replaces the base's value
whole (``null`` included). A base may extend another; a cycle is refused. The ``extends`` key itself is not part of the resolved spec (nor of its digest).

``--set key.path=value`` (repeatable, applied in order after ``extends``): the path walks mappings by
key and lists by index (``probes.0.epochs=10``); the value is read as YAML (``resolutions=[224]``,
``dataset.split.seed=3``, ``description=a b``). What comes out is validated like any spec, so a misspelt
key is named with its full path and the closest allowed key.

A leaf of the spec (``yaml`` only): the command line reads the tracking URI of a spec from here within
milliseconds, before the validation imports torch.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dinoscale import record
from dinoscale.errors import UserError

EXTENDS = "extends"
_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class SpecError(UserError, ValueError):
    """A spec that cannot run; the message names the file, the field path and what was expected."""

    kind = "spec"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain safe_load keeps the last one silently)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> dict:
    """One spec file's own mapping (no ``extends`` resolved)."""
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on ``base``: mappings merge recursively; anything else (lists, scalars, null) replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def extends_chain(path: str | Path) -> list[Path]:
    """The files a spec is made of, the spec itself first, then what it extends, transitively."""
    chain: list[Path] = []
    path = Path(path)
    while True:
        if path.resolve() in [p.resolve() for p in chain]:
            cycle = " -> ".join(str(p) for p in [*chain, path])
            raise SpecError(f"{chain[0]}: 'extends' makes a cycle ({cycle}); a spec cannot extend itself")
        raw = read_yaml(path)
        chain.append(path)
        parent = raw.get(EXTENDS)
        if parent is None:
            return chain
        if not isinstance(parent, str) or not parent.strip():
            raise SpecError(f"{path}: 'extends' must be the path of another spec file, got {parent!r}")
        base = path.parent / Path(parent).expanduser()
        if not base.is_file():
            raise SpecError(
                f"{path}: extends '{parent}', but {base} is not a file (paths are relative to the spec's folder)"
            )
        path = base


def load_raw(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """The spec as data: its ``extends`` chain merged (base first), then each override applied."""
    raw: dict = {}
    for p in reversed(extends_chain(path)):
        own = read_yaml(p)
        own.pop(EXTENDS, None)
        raw = merge(raw, own)
    return apply_overrides(raw, overrides, source=str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.path=value`` -> (path parts, value read as YAML); a malformed one is a one-line SpecError."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise SpecError(
            f"--set {text!r}: expected key.path=value, e.g. --set resolutions=[224] or --set probes.0.epochs=10"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise SpecError(f"--set {text!r}: the value is not valid YAML ({first}); quote it, e.g. {key}='...'") from None
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: Sequence[str], source: str = "<spec>") -> dict:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(
                        f"{source}: --set {text}: '{where}' - {'.'.join(parts[:i]) or 'the spec'} is a list of "
                        f"{len(node)}; give an index 0-{len(node) - 1}"
                    )
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise SpecError(
                    f"{source}: --set {text}: '{'.'.join(parts[:i])}' is a value ({node!r}), not a mapping or a list"
                )
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}  # a new mapping: validation names the key if it does not belong
                node = node[key]
    return out


def provenance_tags(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, str]:
    """What the parent run records of where its spec came from (its resolved YAML is logged beside them)."""
    tags = {record.SPEC_FILE: " < ".join(str(p) for p in extends_chain(path))}
    if overrides:
        tags[record.SPEC_OVERRIDES] = "\n".join(overrides)
    return tags
