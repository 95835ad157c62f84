"""External test sets in a frozen cell's trial: the probe fitted on the cell's train (selected on val) scores
each external set's rows too, and each set is reported on the internal classes it maps onto.

The external rows are scored by the same fitted model as test: they are appended to the test split (a view of
both feature sets; nothing is read before the probe asks) and the probe's test outputs are cut back apart.
Every vector and bag probe scores a test unit from the train (and val) units alone - linear and logistic
heads, k-NN votes, pooled and attention-MIL heads over a bag, their standardisation fitted on train - so the
test outputs are those of a fit without the external units, and each external unit's output is what the same
model gives it (``tests/test_external.py`` checks each probe).

Metrics, one family per set (names: ``dinoscale.record.external_name``): the macro AUROC on the external set,
the internal test macro AUROC over the same classes, and the drop (internal - external); each with its
patient-bootstrap interval (the drop's from independent resamples of both sets' patients). The class set is
fixed before resampling: the mapped classes with ``macro_min_patients`` positive and negative patients in both
sets (none qualifies: 1, as the headline does).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np

from dinoscale import record
from dinoscale.data import SplitUnits
from dinoscale.features.rows import take_items
from dinoscale.metrics import difference_bootstrap, macro_auroc, macro_class_set, patient_bootstrap
from dinoscale.probes import BagSplit, Split
from dinoscale.sweep.cell import Cell
from dinoscale.sweep.inputs import probe_inputs


def with_external_rows(cell: Cell, externals: dict, ext_classes: dict, classes: list[str], store, test, probe_spec):
    """The test input with every external set's rows appended (labels padded onto the internal classes), and
    the number of rows of each part (test first) to cut the probe's outputs apart again. ``externals``: label ->
    its ``SplitUnits``; ``ext_classes``: label -> the internal classes it is labelled with."""
    if not cell.external_keys or not isinstance(test, (Split, BagSplit)):
        return test, {}
    xs, ys, sizes = [test.x], [np.asarray(test.y)], {"": len(test.y)}
    for label, digest in cell.external_keys:
        units = externals[label]
        ext = probe_inputs(replace(cell, feature_keys=((label, digest),)), units, store, label, probe_spec)
        y = np.zeros((len(units.sample_ids), len(classes)), dtype=np.float32)
        y[:, [classes.index(c) for c in ext_classes[label]]] = units.labels
        xs.append(ext.x)
        ys.append(y)
        sizes[label] = len(units.sample_ids)
    if isinstance(test, BagSplit):  # bags (slides, pooled volumes): the lists of bags one after the other
        return BagSplit([b for x in xs for b in x], np.concatenate(ys), test.exclusive, test.select), sizes
    n = sum(sizes.values())
    return Split(take_items(xs, np.arange(n)), np.concatenate(ys), test.exclusive, test.select), sizes


def cut_outputs(scores: np.ndarray, sizes: dict[str, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The probe's test outputs split back into test's and each external set's."""
    if not sizes:
        return scores, {}
    ends = np.cumsum(list(sizes.values()))
    parts = dict(zip(sizes, np.split(np.asarray(scores), ends[:-1])))
    return parts.pop(""), parts


def external_metrics(
    test: SplitUnits,
    test_scores: np.ndarray,
    externals: dict,
    ext_classes: dict,
    classes: list[str],
    outputs: dict,
    bootstrap: dict,
) -> dict[str, float]:
    """Every external set's metrics (``external.<label>.*``) from its outputs and the internal test's."""
    out: dict[str, float] = {}
    for label, scores in outputs.items():
        units = externals[label]
        idx = [classes.index(c) for c in ext_classes[label]]
        out.update(_one_set(label, test, test_scores[:, idx], test.labels[:, idx], units, scores[:, idx], bootstrap))
    return out


def _one_set(label: str, test: SplitUnits, s_int, y_int, ext: SplitUnits, s_ext, b: dict) -> dict[str, float]:
    name = partial(record.external_name, label)
    out = {
        name(record.EXTERNAL_UNITS): float(len(ext.sample_ids)),
        name(record.EXTERNAL_PATIENTS): float(len(set(ext.patient_ids))),
        name(record.EXTERNAL_CLASSES): float(y_int.shape[1]),
    }
    k = b.get(record.MACRO_MIN_PATIENTS, 5)
    both = macro_class_set(y_int, test.patient_ids, k) & macro_class_set(ext.labels, ext.patient_ids, k)
    if not both.any():
        both = macro_class_set(y_int, test.patient_ids, 1) & macro_class_set(ext.labels, ext.patient_ids, 1)
    if not both.any():  # no mapped class with both kinds of patient in both sets: nothing comparable
        return out
    metric = partial(macro_auroc, classes=np.flatnonzero(both))
    run = {
        "metric": metric,
        "resamples": b.get("resamples", 1000),
        "level": b.get("level", 0.95),
        "seed": b.get("seed", 0),
        "min_units": b.get("min_interval_units", 10),
    }
    internal = (y_int, s_int, test.patient_ids)
    external = (ext.labels, s_ext, ext.patient_ids)
    out.update(patient_bootstrap(*external, **run).as_dict(name(record.EXTERNAL_METRIC)))
    out.update(patient_bootstrap(*internal, **run).as_dict(name(record.EXTERNAL_INTERNAL)))
    out.update(difference_bootstrap(internal, external, **run).as_dict(name(record.EXTERNAL_DROP)))
    return out
