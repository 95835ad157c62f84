"""Where a sweep's numbers come from, decided once: the banner, the MLflow tags and every report use it.

A result is a *demo* when anything in it is not about real patients seen through pretrained weights:
the demo profile, generated data (a phantom, or synthetic findings in real anatomy), or randomly
initialised weights. A *rehearsal* (``dinoscale rehearse``, profile ``rehearsal``) is one case of it: a
paper spec run on a generated replica of its dataset's published layout with random weights, which
proves that the layout, adapter, readers and protocol path run end to end and nothing else; it is
labelled REHEARSAL wherever a number appears. Whatever prints or records a result asks ``Provenance``
instead of deciding again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dinoscale import record

REAL, PHANTOM, SEMI_SYNTHETIC = "real", "phantom", "semi-synthetic"  # the values of record.DATA_SOURCE
SYNTHETIC_SOURCES = (PHANTOM, SEMI_SYNTHETIC)
DEMO_NOTE = "DEMO: phantom data and/or random weights - numbers exercise the pipeline, they say nothing about DINOv3"
DEMO_HEADLINE = "DEMO RUN: the numbers exercise the pipeline; they say nothing about DINOv3 on real data."
REHEARSAL_NOTE = (
    "REHEARSAL: a paper spec on a generated replica of its dataset's layout with random weights and scaled-down "
    "models - it proves the layout, readers and protocol path run, the numbers mean nothing"
)
REHEARSAL_HEADLINE = (
    "REHEARSAL, NOT A RESULT: a paper spec run on a generated replica of its dataset's published layout with "
    "random weights and scaled-down models; the numbers say nothing about DINOv3 or the data."
)


def data_tags(
    source: str,
    name: str,
    *,
    root: object = None,
    split: str | None = None,
    generator: str | None = None,
    seed: object = None,
    base: str | None = None,
    patient_ids: str | None = None,
    excluded: str | None = None,
) -> dict[str, str]:
    """A dataset's ``data.*`` tags (``PreparedDataset.provenance``), the fields it has; the adapters' one spelling."""
    fields = {
        record.DATA_SOURCE: source,
        record.DATA_NAME: name,
        record.DATA_ROOT: root,
        record.DATA_SPLIT: split,
        record.DATA_GENERATOR: generator,
        record.DATA_SEED: seed,
        record.DATA_BASE: base,
        record.DATA_PATIENT_IDS: patient_ids,
        record.DATA_EXCLUDED: excluded,
    }
    return {k: str(v) for k, v in fields.items() if v is not None}


def is_synthetic(data: dict[str, str]) -> bool:
    """Generated data (a phantom, or synthetic labels on real anatomy), from a dataset's ``data.*`` tags."""
    return data.get(record.DATA_SOURCE) in SYNTHETIC_SOURCES


@dataclass(frozen=True)
class Provenance:
    profile: str  # demo | paper | rehearsal (unknown for a results table)
    data: dict[str, str] = field(default_factory=dict)  # the dataset's data.* tags
    weights: tuple[str, ...] = ()  # weights kind of each backbone: random | hub | file
    weights_known: bool = True  # False when read back from tags (kinds only, no per-backbone counts)

    @classmethod
    def of_sweep(cls, profile: str, data_tags: dict[str, str], weights_kinds: list[str]) -> Provenance:
        return cls(profile, dict(data_tags), tuple(weights_kinds))

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Provenance:
        """What a sweep's parent run recorded (sweeps of any version: absent tags stay unknown)."""
        kinds = tuple(k for k in tags.get(record.WEIGHTS_KINDS, "").split(",") if k)
        data = {
            k: v
            for k, v in tags.items()
            if k.startswith(record.DATA_PREFIX) and not k.startswith(record.MANIFEST_DIGEST_PREFIX)
        }
        return cls(tags.get(record.PROFILE, "unknown"), data, kinds, weights_known=False)

    @classmethod
    def from_table(cls, sources: dict[str, str | None], weights: list[str]) -> Provenance:
        """A results table's: its datasets (name -> data source where known, None where not) and the weights
        its rows name. Synthetic data anywhere in the table makes all of it a demo, as random weights do."""
        known = {s for s in sources.values() if s}
        source = next((s for s in SYNTHETIC_SOURCES if s in known), REAL if known == {REAL} else None)
        data = {record.DATA_SOURCE: source} if source else {}
        if sources:
            data[record.DATA_NAME] = ", ".join(sorted(sources))
        return cls("unknown", data, tuple(sorted({w for w in weights if w})), weights_known=False)

    @property
    def source(self) -> str:
        return self.data.get(record.DATA_SOURCE, "unknown")

    @property
    def synthetic_data(self) -> bool:
        return is_synthetic(self.data)

    @property
    def random_weights(self) -> bool:
        return "random" in self.weights

    @property
    def rehearsal(self) -> bool:
        return self.profile == "rehearsal"

    @property
    def demo(self) -> bool:
        return self.profile == "demo" or self.rehearsal or self.synthetic_data or self.random_weights

    @property
    def headline(self) -> str | None:
        """The line in capitals above every table, banner and report of these numbers (None: a real result)."""
        if self.rehearsal:
            return REHEARSAL_HEADLINE
        return DEMO_HEADLINE if self.demo else None

    @property
    def label(self) -> str:
        """The few words after a table's caption: what is not real about these numbers ('' for a real result)."""
        if self.rehearsal:
            return "REHEARSAL (replica data / random weights), not a result"
        if not self.demo:
            return ""
        why = [w for w, on in (("phantom data", self.synthetic_data), ("random weights", self.random_weights)) if on]
        return f"DEMO ({' / '.join(why) or 'demo profile'})"

    def lines(self) -> list[str]:
        """One line about the data and one or two about the weights, in capitals where not real."""
        d, out = self.data, []
        if self.rehearsal:
            out.append(
                f"data: REHEARSAL REPLICA of {d.get(record.DATA_NAME, 'the dataset')}'s published layout "
                f"({d.get(record.DATA_ROOT, '')}) - generated files, not patient data"
            )
        elif self.source == SEMI_SYNTHETIC:
            out.append(
                f"data: SEMI-SYNTHETIC ({d.get(record.DATA_GENERATOR)}, seed {d.get(record.DATA_SEED)}) - synthetic "
                f"lesions in real anatomy ({d.get(record.DATA_BASE, '')}), labels are synthetic, not patient data"
            )
        elif self.source == PHANTOM:
            how = (
                f"{d.get(record.DATA_GENERATOR)}, seed {d.get(record.DATA_SEED)}"
                if record.DATA_GENERATOR in d
                else d.get(record.DATA_NAME, "generated")
            )
            out.append(f"data: PHANTOM ({how}) - synthetic, not patient data")
        elif d.get(record.DATA_NAME):
            out.append(f"data: {d[record.DATA_NAME]} ({d.get(record.DATA_ROOT, '')})")
        counts = Counter(self.weights)
        if self.random_weights:
            out.append(
                f"weights: RANDOM init for {counts['random']} of {len(self.weights)} backbone(s) - no pretrained features"
                if self.weights_known
                else "weights: RANDOM init for at least one backbone - no pretrained features"
            )
        pretrained = [k for k in ("hub", "file") if counts.get(k)]
        if pretrained and self.weights_known:
            out.append(f"weights: pretrained ({counts.get('hub', 0)} hub, {counts.get('file', 0)} local file)")
        elif self.weights and not self.weights_known:
            out.append(f"weight sources: {','.join(sorted(set(self.weights)))}")
        return out

    def tags(self) -> dict[str, str]:
        """The parent run's provenance tags (copied to every child run)."""
        tags = {
            **self.data,
            record.PROFILE: self.profile,
            record.DEMO: str(self.demo).lower(),
            record.WEIGHTS_KINDS: ",".join(sorted(set(self.weights))),
        }
        if self.rehearsal:
            tags[record.REHEARSAL] = "true"
            tags[record.NOTE] = REHEARSAL_NOTE
        elif self.demo:
            tags[record.NOTE] = DEMO_NOTE
        return tags
