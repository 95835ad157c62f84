"""The record schema: every name the MLflow record uses, defined once.

The sweep writes these names (runner, trial), the terminal shows them (display) and the analysis reads
them back (sources); all of them import this module, so a tag or an axis cannot be spelt two ways.
A leaf module: it imports nothing from dinoscale.

Layout of one sweep in MLflow: an experiment per spec (``dinoscale-<spec name>`` unless the spec names one); a parent run per sweep (role ``sweep``);
a child run per cell (role ``cell``), found again on resume by its deterministic trial key. A lora /
full cell's run has one child run per configuration of its search (role ``configuration``, found
again by its own key): sweep -> cell -> configuration, three levels of ``mlflow.parentRunId``.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- tags: structure of the record

PARENT_RUN_ID = "mlflow.parentRunId"
GIT_COMMIT = "mlflow.source.git.commit"
ROLE = "dinoscale.role"  # sweep | cell | configuration
ROLE_SWEEP = "sweep"
ROLE_CELL = "cell"
ROLE_CONFIGURATION = "configuration"  # one configuration of a lora / full cell's search, under the cell's run
SWEEP_ID = "dinoscale.sweep_id"
SPEC_DIGEST = "dinoscale.spec_digest"
SPEC_FILE = "dinoscale.spec_file"  # the spec file a sweep started from, then each file it extends ("a.yaml < b.yaml")
SPEC_OVERRIDES = "dinoscale.spec_overrides"  # the --set overrides applied to it, one per line, in order
SPEC_NAME = "dinoscale.spec_name"  # on a parent run: the spec's name (what `dinoscale analyze SPEC` looks for)
DESCRIPTION = "mlflow.note.content"  # a run's description, as the MLflow UI shows it (the parent: what the sweep was)
TRIAL_KEY = "dinoscale.trial_key"
CELL = "dinoscale.cell"
EVALUATIONS = "dinoscale.evaluations"  # times a cell's work ran (1 unless retried / resumed mid-cell)
RESUMES = "dinoscale.resumes"
ERROR = "dinoscale.error"  # why a cell failed: the user error's message, else the traceback's last line
INTERRUPTED = "dinoscale.interrupted"  # on a parent run stopped by SIGINT / SIGTERM: signal, stage, time
SELECTED_PREFIX = "selected."  # hyper-parameters chosen on val, one tag each
SELECTION_EDGE = "dinoscale.selection_on_edge"  # a value chosen on val at a grid edge, e.g. "lr=1 (top)"
INTERVAL = "dinoscale.interval"  # why a run's headline has no interval (too few test units), when it has none
RAY_TRIAL_ID = "ray.trial_id"
RAY_NODE_ID = "ray.node_id"
FEATURE_KEYS = "features.keys"  # split:digest of the feature sets a cell read
RECIPE_DIGEST = "features.recipe"  # the digest of the cell's feature recipe (dinoscale.features.recipe)

# The experiment's kind, as the MLflow UI reads it (3.x): a model-training experiment, not a GenAI one.
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
# The MLflow UI (3.17) opens an experiment on its GenAI pages unless the link names the workflow:
RUNS_TABLE_QUERY = "workflowType=machine_learning"

# lora / full cells: the search over configurations (one Ray Tune trial each), stopped early by ASHA
CONFIGURATION = "dinoscale.configuration"  # a configuration run: its index in the cell's search (0 = stated values)
CONFIGURATION_STATE = "dinoscale.configuration_state"  # one of CONFIGURATION_STATES
CONFIG_RUNNING = "running"
CONFIG_COMPLETE = "complete"  # trained to its last epoch, or until its own patience ran out
CONFIG_STOPPED = "stopped"  # stopped early by the scheduler (its val metric lost at a rung); GPU freed
CONFIG_FAILED = "failed"
CONFIGURATION_STATES = (CONFIG_RUNNING, CONFIG_COMPLETE, CONFIG_STOPPED, CONFIG_FAILED)
STOPPED_AT_EPOCH = "dinoscale.stopped_at_epoch"  # epochs a stopped configuration had trained
SELECTED_CONFIGURATION = "dinoscale.selected_configuration"  # on the cell run: the index chosen on val
SELECTED_RUN = "dinoscale.selected_run_id"  # on the cell run: that configuration's run

# ---------------------------------------------------------------- tags: what the numbers mean

TASK = "dinoscale.task"
PROFILE = "dinoscale.profile"
MODALITY = "dinoscale.modality"
HEADLINE = "dinoscale.headline"  # test_<name> of the task's headline metric
HEADLINE_GOAL = "dinoscale.headline_goal"  # max | min

# provenance (dinoscale.provenance decides them; every child run copies them from its parent)
DEMO = "dinoscale.demo"  # "true" when any number is not about real data with pretrained weights
NOTE = "dinoscale.note"
DATA_SOURCE = "data.source"  # real | phantom | semi-synthetic
DATA_NAME = "data.name"
DATA_ROOT = "data.root"
DATA_GENERATOR = "data.generator"
DATA_SEED = "data.seed"
DATA_BASE = "data.base"  # semi-synthetic: the real file the synthetic findings were put into
DATA_SPLIT = "data.split"
DATA_SKIPPED = "data.skipped"  # how many files on_bad_file=skip dropped
DATA_SKIPPED_FILES = "data.skipped_files"  # their names (the first few)
DATA_PATIENT_IDS = "data.patient_ids"  # how patient ids were derived, where the files do not say
DATA_EXCLUDED = "data.excluded"  # what the protocol leaves out of the dataset and why (e.g. Camelyon17 ITC slides)
MANIFEST_DIGEST_PREFIX = "data.manifest_digest."  # + split
WEIGHTS_KINDS = "weights.kinds"  # on the parent: every kind of weights in the sweep (random, hub, file)
WEIGHTS_KIND = "weights.kind"  # on a child: its backbone's
WEIGHTS_DIGEST = "weights.digest"
# a rehearsal (dinoscale.rehearse): a paper spec run on a replica of its dataset's layout with random weights
REHEARSAL = "dinoscale.rehearsal"  # "true" on every run of a rehearsal
REHEARSAL_PREFIX = (
    "rehearsal."  # + what the rehearsal changed in the paper spec (tags on every run, params on the parent)
)
REHEARSAL_SOURCE_SPEC = REHEARSAL_PREFIX + "source_spec"  # the paper spec's file
REHEARSAL_SOURCE_DIGEST = REHEARSAL_PREFIX + "source_digest"  # its digest (dinoscale validate prints it)
REHEARSAL_VARIANT = REHEARSAL_PREFIX + "variant"  # ok | corrupt_file | bad_label | mask_shape
REHEARSAL_REPLICA = REHEARSAL_PREFIX + "replica_root"  # where the replica was written
DATA_PREFIX = "data."  # every tag a dataset records about itself
PROVENANCE_PREFIXES = (
    DATA_PREFIX,
    WEIGHTS_KINDS,
    PROFILE,
    MODALITY,
    DEMO,
    NOTE,
    REHEARSAL,
    REHEARSAL_PREFIX,
)  # copied from parent to children

PREFLIGHT = "dinoscale.preflight"  # on an experiment: when the pre-flight last proved it can write there

# Tag namespaces this module owns: any tag of the form ``<namespace><name>`` is defined here, nowhere else.
TAG_NAMESPACES = ("dinoscale.", DATA_PREFIX, "weights.", REHEARSAL_PREFIX)

# ---------------------------------------------------------------- params and metrics of a cell run

# Written by the plan / the trial on every cell run, read back by the analysis into a results table.
MODALITY_PARAM = "modality"
DATASET_PARAM = "dataset"
WEIGHTS_PARAM = "weights"  # the backbone's weights source (random | hub | a file)
# single-word params: a word like these is a name where it is a key of a run's params or a results table
WORD_PARAMS = (MODALITY_PARAM, DATASET_PARAM, WEIGHTS_PARAM)
# a results table's column: the encoder family of a cell's backbone (dinoscale.models.families); runs that do
# not carry it get ``families.family_of(backbone)``
FAMILY_PARAM = "family"
MACRO_MIN_PATIENTS = "macro_min_patients"  # param and metric: the fewest positive patients a class needs
# metric: 1 where the macro class set counts a patient negative when any of its units lacks the label (frames)
MACRO_NEGATIVES = "macro_negative_units"
TOKENS_PER_IMAGE = "tokens_per_image"  # metric: tokens the encoder sees per image at the cell's resolution
GFLOPS_PER_IMAGE = "gflops_per_image"  # metric (and plan param): the compute axis
GFLOPS = "gflops"  # its name in a results table
# metric (and results-table column): the patients a cell's replicate trained on (after its training-set-size
# subset, where the sweep has that axis): the x of the label-efficiency curve
N_TRAIN_PATIENTS = "n_train_patients"
# A metric's interval: <metric>_ci_low / <metric>_ci_high (metrics.Interval writes them, everyone reads them)
CI_LOW = "_ci_low"
CI_HIGH = "_ci_high"
SUFFIXES = (CI_LOW, CI_HIGH)


def ci_names(metric: str) -> tuple[str, str]:
    """The names of ``metric``'s interval bounds: (``<metric>_ci_low``, ``<metric>_ci_high``)."""
    return metric + CI_LOW, metric + CI_HIGH


METRIC_CI = ci_names("metric")  # the driver's row of a cell (runner, display, describe): its headline's interval
# Registration: every per-pair metric of the warped labels also for the identity transform (the stated baseline),
# as <metric>_identity (test_dice_identity beside test_dice); written by dinoscale.metrics, read by the analysis
IDENTITY_SUFFIX = "_identity"


# ---------------------------------------------------------------- metrics: predicted against measured

# The plan predicts bytes on disk and peak memory before a sweep starts; a run logs what it measured
# beside each prediction (child runs: the trial; the parent run: the extraction stage and the store).
TRIAL_PEAK_RSS_MB = "memory_trial_peak_rss_mb"
TRIAL_PEAK_RSS_PREDICTED_MB = "memory_trial_peak_rss_predicted_mb"
EXTRACTION_PEAK_RSS_MB = "memory_extraction_peak_rss_mb"  # the largest of the stage's tasks
EXTRACTION_PEAK_RSS_PREDICTED_MB = "memory_extraction_peak_rss_predicted_mb"
FEATURE_BYTES_MEASURED = "features_bytes_measured"  # the sweep's feature sets in the store
FEATURE_BYTES_PREDICTED = "features_bytes_predicted"
EXTRACTION_SHARDS_EXTRACTED = "extraction_shards_extracted"
EXTRACTION_SHARDS_CACHED = "extraction_shards_cached"  # committed by an earlier, interrupted run
# The feed of the extraction stage (fused extraction, dinoscale.features.fused): files read per manifest file
# (1: each decoded once for every feature set of the sweep), encoder inputs per second of the stage's tasks,
# the share of their time spent decoding files, and the GPU's utilisation where there is one.
EXTRACTION_DECODES_PER_FILE = "extraction_decodes_per_file"
EXTRACTION_IMAGES_PER_SECOND = "extraction_images_per_second"
EXTRACTION_DECODE_SHARE = "extraction_decode_share"
EXTRACTION_GPU_UTILIZATION = "extraction_gpu_utilization"

# ---------------------------------------------------------------- artifacts

PREDICTIONS = "predictions/test.csv"
SEARCH_TABLE = "search/configurations.csv"  # on a lora / full cell run: every configuration, its state and val
TRACEBACK = "error/traceback.txt"
RESOLVED_SPEC = "spec/resolved.yaml"
PROTOCOL = "protocol/protocol.md"  # the sweep's protocol table (every constant; dinoscale.sweep.protocol)
PROTOCOL_JSON = "protocol/protocol.json"
FEATURE_RECIPES = "protocol/feature_recipes.json"  # recipe digest -> every field of the sweep's feature recipes
EXTRACTION_DIR = "extraction"
FEATURE_SETS = "extraction/feature_sets.json"  # per feature set: predicted and measured bytes, shards
REPORT_DIR = "report"

# ---------------------------------------------------------------- metrics of the search (lora / full)

EPOCH = "epoch"  # configuration runs: epochs completed (the scheduler's time axis; per-epoch metrics use it as step)
SELECTION_VALUE = "selection_value"  # the val headline as maximised (-VOI for VOI): what ASHA and the selection compare
BEST_SELECTION_VALUE = "best_selection_value"  # a configuration's best epoch's selection value
TRAIN_LOSS = "train_loss"
SCHEDULED_LR = "scheduled_lr"  # the learning rate at the end of an epoch (warm-up + cosine), per epoch
EPOCHS_RUN = "epochs_run"
BEST_EPOCH = "best_epoch"
OOM_BACKOFFS = "oom_backoffs"
MICRO_BATCH_SIZE = "micro_batch_size"  # in use at the end of a configuration (after any out-of-memory back-off)
SEARCH_CONFIGURATIONS = "search_configurations"  # cell: its budget
CONFIGURATIONS_COMPLETE = "configurations_complete"
CONFIGURATIONS_STOPPED = "configurations_stopped"
CONFIGURATIONS_FAILED = "configurations_failed"
CONFIGURATION_EPOCHS = "configuration_epochs"  # cell: epochs trained over all its configurations (compute spent)
CONFIGURATION_EPOCHS_BUDGET = "configuration_epochs_budget"  # budget x epochs: what a search without stopping trains

# ---------------------------------------------------------------- the grid axes


@dataclass(frozen=True)
class Axis:
    """One axis of the sweep grid, as the record holds it.

    ``numeric`` axes are logged as params *and* metrics (MLflow sorts params as strings); ``scaling``
    axes are the x of a scaling curve; ``replicate`` axes are aggregated over (never a curve of their
    own); the others split the results into separate curves and comparisons.
    """

    name: str
    numeric: bool = False
    scaling: bool = False
    replicate: bool = False
    # an optional axis: the value of a run or a table that does not state it (a sweep without the axis), which
    # the report's words leave unsaid; None: the axis is in every sweep
    default: str | None = None


AXES: tuple[Axis, ...] = (
    Axis("backbone"),
    Axis("n_params", numeric=True, scaling=True),
    Axis("resolution", numeric=True, scaling=True),
    Axis("probe"),
    Axis("strategy"),
    # the training-set size (spec ``train_size``): a fraction of the train patients ('0.1'), a count ('20pt') or k
    # patients per class ('5shot'), drawn per replicate (dinoscale.data.splits.train_subset_recipe); 'all' where a
    # sweep has no such axis. A grouping axis: the label-efficiency curve runs across it (x: N_TRAIN_PATIENTS)
    Axis("train_size", default="all"),
    # the replicate axis: seed k seeds initialisation and batch order and draws replicate k's train / val
    # split (dinoscale.data.splits.replicate_recipe); replicates are pooled by the analysis, never a curve
    Axis("seed", numeric=True, replicate=True),
)
REPLICATE_AXIS = next(a.name for a in AXES if a.replicate)
TRAIN_SIZE_AXIS = "train_size"
AXIS_DEFAULTS = {a.name: a.default for a in AXES if a.default is not None}
AXIS_NAMES = tuple(a.name for a in AXES)
NUMERIC_AXES = tuple(a.name for a in AXES if a.numeric)
# Where a cell sits in the grid, replicates aside (a configuration whose replicates are pooled).
CELL_AXES = tuple(a.name for a in AXES if not a.replicate)
# Axes that split results into separate curves (everything that is neither a scaling axis, nor the
# backbone that the size axis stands for, nor a replicate).
GROUP_AXES = tuple(a.name for a in AXES if not (a.numeric or a.name == "backbone"))
CONTEXT_COLUMNS = (MODALITY_PARAM, DATASET_PARAM)  # what a results table says beyond the axes
# The columns that identify a configuration in a results table: context, grouping axes, then the rest.
CELL_KEYS = CONTEXT_COLUMNS + GROUP_AXES + tuple(a for a in CELL_AXES if a not in GROUP_AXES)

# ---------------------------------------------------------------- external test sets (spec ``external``)

# A cell's probe (fitted on its train, selected on val) also scores each external test set; its metrics are
# one family per set: external.<label>.<metric>, with intervals as every metric (ci_names). The metrics:
EXTERNAL_PREFIX = "external."
EXTERNAL_METRIC = "auroc"  # macro AUROC: the headline on the external set, over the mapped classes only
EXTERNAL_INTERNAL = "internal_auroc"  # the internal test headline restricted to the same mapped classes
EXTERNAL_DROP = "drop"  # internal - external, interval from independent patient resamples of both sets
EXTERNAL_UNITS = "units"  # external units scored
EXTERNAL_PATIENTS = "patients"  # external patients (the interval's resampled units)
EXTERNAL_CLASSES = "classes"  # internal classes the external set maps onto
EXTERNAL_METRICS = (EXTERNAL_METRIC, EXTERNAL_INTERNAL, EXTERNAL_DROP)
EXTERNAL_DIGEST = "external_feature_keys"  # tag of a cell run: <label>:<feature-store digest>, comma-separated


def external_name(label: str, metric: str) -> str:
    """The name of ``metric`` of external test set ``label``: ``external.<label>.<metric>``."""
    return f"{EXTERNAL_PREFIX}{label}.{metric}"


def parse_external_name(name: str) -> tuple[str, str] | None:
    """(label, metric) of an external metric's name (its interval bounds included), else None."""
    if not name.startswith(EXTERNAL_PREFIX):
        return None
    label, _, metric = name[len(EXTERNAL_PREFIX) :].rpartition(".")
    return (label, metric) if label else None
