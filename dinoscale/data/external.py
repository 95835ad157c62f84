"""External test sets: another dataset's rows, relabelled onto the internal class set (spec ``external``).

An external set is prepared by its own adapter (its own files, patients, colour model), then its manifest is
cut to the rows it scores (``all``, or its ``test`` split), put in one split of its own (``EXTERNAL_SPLIT``)
and its classes mapped onto the internal ones: each internal class an external class maps onto becomes a 0/1
column (several external classes onto one internal class: positive if any is), every other column of labels
dropped. Its manifest digest (and so its feature-store keys) is its own. A class that is neither mapped nor
dropped, or mapped onto an unknown internal class, is refused before anything runs.
"""

from __future__ import annotations

import dataclasses

from dinoscale.data.dataset import CENTER_COLUMN, PreparedDataset
from dinoscale.errors import UserError

EXTERNAL_SPLIT = "external"  # the one split of an external set: the rows it scores


class ExternalMappingError(UserError, ValueError):
    """An external set's classes do not map onto the internal class set (said before anything starts)."""

    kind = "spec"


def class_mapping(
    label: str, external: list[str], internal: list[str], given: dict[str, str] | None, drop: list[str]
) -> dict[str, str]:
    """{external class: internal class} of an external set: ``given`` (none: same names), checked whole."""
    where = f"external '{label}'"
    unknown_drop = [c for c in drop if c not in external]
    if unknown_drop:
        raise ExternalMappingError(
            f"{where}: drop lists {unknown_drop}, which the external dataset does not have (its classes: {external})"
        )
    # omitted: each external class onto the internal class of its name (one without such a class is unmapped)
    mapping = dict(given) if given is not None else {c: c for c in external if c not in drop and c in internal}
    not_external = [c for c in mapping if c not in external]
    onto_unknown = {e: i for e, i in mapping.items() if i not in internal}
    unmapped = [c for c in external if c not in mapping and c not in drop]
    both = [c for c in drop if c in mapping]
    if not_external:
        why = f"classes: maps {not_external}, which the external dataset does not have (its classes: {external})"
    elif onto_unknown:
        why = f"classes: maps {onto_unknown} onto unknown internal class(es); the internal classes are {internal}"
    elif unmapped:
        why = (
            f"external class(es) {unmapped} are not mapped onto the internal classes {internal}: map each under "
            f"external.classes ({{{unmapped[0]}: <internal class>}}) or leave it out explicitly with drop: {unmapped}"
        )
    elif both:
        why = f"classes {both} are both mapped and dropped: keep one"
    elif not mapping:
        why = f"no class is mapped onto the internal classes {internal}: nothing to score"
    else:
        return mapping
    raise ExternalMappingError(f"{where}: {why}")


def external_dataset(
    ds: PreparedDataset, rows: str, mapping: dict[str, str], internal: list[str], label: str = "", centers=None
) -> PreparedDataset:
    """The rows ``rows`` (all | test) of ``ds`` in the one split ``EXTERNAL_SPLIT``, labelled with the internal
    classes ``mapping`` reaches (in the internal order); ``centers``: only the rows of these centres."""
    df = ds.manifest if rows == "all" else ds.manifest[ds.manifest["split"] == "test"]
    if centers is not None:
        df = _of_centers(df, ds.name, label, [str(c) for c in centers])
    targets = [c for c in internal if c in mapping.values()]
    labels = {t: df[[e for e, i in mapping.items() if i == t]].max(axis=1).astype(int) for t in targets}
    out = df.drop(columns=list(ds.classes)).assign(split=EXTERNAL_SPLIT, **labels).reset_index(drop=True)
    return dataclasses.replace(ds, classes=targets, manifest=out, _digests={})


def _of_centers(df, name: str, label: str, centers: list[str]):
    """The rows of ``centers`` (the dataset's centre column), refused whole when it has no such column or rows."""
    if CENTER_COLUMN not in df.columns:
        raise ExternalMappingError(
            f"external '{label}': centers {centers} asked, but dataset '{name}' states no centre per row (a "
            f"'{CENTER_COLUMN}' column in its table, e.g. slides.csv); add it or drop 'centers'"
        )
    have = sorted(set(df[CENTER_COLUMN].astype(str)))
    missing = [c for c in centers if c not in have]
    if missing:
        raise ExternalMappingError(f"external '{label}': centers {missing} hold no rows; the dataset's centres: {have}")
    return df[df[CENTER_COLUMN].astype(str).isin(centers)]
