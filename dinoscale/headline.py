"""The headline metric of each task: what a trial selects on (val), reports with an interval (test),
and what the analysis plots, fits and ranks.

MLflow names: ``test_<name>`` (+ ``_ci_low`` / ``_ci_high``) and ``val_<name>`` on every child run;
the sweep's parent run carries ``dinoscale.headline`` (= ``test_<name>``) and
``dinoscale.headline_goal`` (max | min). Per-sample test predictions (``predictions/test.csv``):

- classification / MIL: ``sample_id, patient_id, label_<class>, score_<class>`` (one row per image,
  volume or slide); the analysis recomputes macro AUROC on patient resamples (video frames: macro F1 or
  accuracy of the argmax class, on video resamples).
- segmentation / instance segmentation: ``sample_id, patient_id`` (``group`` where the dataset reports
  samples separately, e.g. CREMI's A / B / C) and one column per per-volume metric (``dice``,
  ``hd95_mm``, ``detection_rate``, ``lesion_detection_rate``, ``fp_volume_ml``, ``voi``, ``arand``, ...; conventions in
  ``dinoscale.metrics.CONVENTIONS``); the headline's column is ``<name>`` and the analysis resamples
  patients and averages it (NaN values skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

from dinoscale import record


@dataclass(frozen=True)
class Headline:
    name: str  # e.g. "macro_auroc", "dice", "voi"
    goal: str  # "max" or "min"
    label: str  # for plots and tables
    per_volume: bool  # predictions are per-volume metric values (not labels + scores)

    @property
    def test(self) -> str:
        return f"test_{self.name}"

    @property
    def val(self) -> str:
        return f"val_{self.name}"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.goal == "max" else a < b

    def tags(self) -> dict[str, str]:
        return {record.HEADLINE: self.test, record.HEADLINE_GOAL: self.goal}


AUROC = Headline("macro_auroc", "max", "test macro AUROC", per_volume=False)
DICE = Headline("dice", "max", "test mean foreground Dice", per_volume=True)
VOI = Headline("voi", "min", "test VOI (split + merge, bits; lower is better)", per_volume=True)
# frames of videos, one class each (the argmax of the scores): the endoscopy tables' F1 (macro over the classes
# present); accuracy is logged beside it (``dinoscale.metrics.FRAME_METRICS``) and can be analysed by name
MACRO_F1 = Headline("macro_f1", "max", "test macro F1 (frames, argmax class)", per_volume=False)
ACCURACY = Headline("accuracy", "max", "test accuracy (frames, argmax class)", per_volume=False)

_BY_TEST_NAME = {h.test: h for h in (AUROC, DICE, VOI, MACRO_F1, ACCURACY)}  # each task's headline: dinoscale.tasks


def headline_from_tags(tags: dict) -> Headline:
    """The headline a sweep recorded (sweeps from before headlines existed: AUROC)."""
    return _BY_TEST_NAME.get(tags.get(record.HEADLINE, AUROC.test), AUROC)
