"""The plan as a budget: what a sweep costs, stage by stage, in the units a lab signs off.

Three stages, each with the resource that bounds it and why:

- **extraction**: every feature set runs the encoder over every input; the table charges each set the decode of
  its inputs (one read per backbone x resolution x view), an upper bound since fused extraction
  (``sweep/extraction.py``) reads each file once for every set of a pass: ``fused_feed`` prices that pass (one
  decode per input, the encoders of the pass side by side, the loader workers and the bound).
  Per task the loader's CPU cores decode while the GPU encodes, so a task takes the longest of three times:
  *decode* (inputs x measured CPU seconds per input / the task's CPU cores), *GPU* (FLOPs measured on each
  model / (published dense bf16 peak x ``UTILISATION``)), *disk* (bytes read / the node's read rate). The
  largest names the bound. Without a GPU (this machine, the demo) the encoder runs on the CPU at a measured
  GFLOP/s and shares the cores with decoding, so the two add up.
- **trials**: a frozen trial reads its cell's features and fits its probe: linear heads (epochs x rows x
  width x classes x heads x 6 FLOPs: forward and backward), k-NN (train x queries x width x 2), dense heads
  (steps x crops x the crop's tokens x width x the head's width x 6), plus a measured fixed cost per trial
  (the trial's process, the bootstrap intervals, the MLflow record). A lora / full trial trains the encoder:
  configurations x epochs x images x (forward + backward = 3 x the forward FLOPs), an upper bound (ASHA
  stops most configurations early).
- **store**: bytes on disk of the feature sets and what keeping them costs (``cluster/costs.yaml``).

Wall-clock is the work of each stage spread over the cluster's slots (how many tasks of a stage fit its
nodes at once, from the spec's ``resources``), plus the boot of each GPU node. Dollars are node-hours at the
prices of ``cluster/costs.yaml``, on demand and spot. Every constant is stated below with where it comes from;
``dinoscale calibrate`` measures the CPU ones on the machine it runs on (``DINOSCALE_CALIBRATION``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from dinoscale.data.refs import is_hdf5_ref
from dinoscale.errors import UserError
from dinoscale.probes import get_probe
from dinoscale.spec import load_spec
from dinoscale.sweep import cost

# Sustained share of the dense bf16 peak that ViT inference reaches (batched, bf16 autocast): 30-50 % is what
# published inference benchmarks of ViT-B/L reach on A100 / H100; 0.4 is a planning figure, stated, not measured.
UTILISATION = 0.4


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # published dense (no sparsity) bf16 tensor-core peak
    memory_gib: float
    source: str

    @property
    def sustained_flops(self) -> float:
        return self.bf16_tflops * 1e12 * UTILISATION


GPUS = {
    g.name: g
    for g in (
        GPU(
            "A10G",
            70.0,
            24,
            "AWS g5 A10G: 70 TFLOP/s dense fp16/bf16 tensor (NVIDIA publishes no A10G sheet; tabulated in Baseten's "
            "'NVIDIA A10 vs A10G for ML model inference'; the A10's own datasheet says 125)",
        ),
        GPU("L4", 121.0, 24, "NVIDIA L4 datasheet: 242 TFLOP/s bf16 with sparsity, i.e. 121 dense"),
        GPU("A100", 312.0, 40, "NVIDIA A100 datasheet (SXM4): 312 TFLOP/s bf16 dense, 624 with sparsity"),
        GPU("H100", 989.0, 80, "NVIDIA H100 datasheet (SXM5): 1,979 TFLOP/s bf16 with sparsity, i.e. 989 dense"),
    )
}

# ---------------------------------------------------------------- CPU: decoding and the encoder on the CPU

# Decode + preprocess (the real readers of dinoscale/data/readers.py, then the anti-aliased resize to 224 px of
# dinoscale/data/preprocess.py) per CPU core, per input kind: seconds per input at `pixels` (scaled by the
# pixels of a dataset's inputs), and bytes per input on disk. Volumes (NIfTI, HDF5) are per slice / section.
# Written by `dinoscale calibrate --python` on the machine named in CALIBRATION_LABEL.
CALIBRATION_LABEL = (
    "measured on AMD EPYC (this project's CI machine, 2 cores, load average 5.5: shared), 2026-12-05, "
    "by `dinoscale calibrate`"
)
DECODE = {
    "png": {"seconds": 0.01859, "pixels": 1048576, "bytes": 730915},
    "jpeg": {"seconds": 0.02719, "pixels": 1048576, "bytes": 275665},
    "tile": {"seconds": 0.002455, "pixels": 50176, "bytes": 105139},
    "dicom": {"seconds": 0.01581, "pixels": 1048576, "bytes": 1049274},
    "nifti_gz": {"seconds": 0.0268, "pixels": 262144, "bytes": 262040},
    "npz_volume": {"seconds": 0.004513, "pixels": 4096, "bytes": 4096},
    "hdf5": {"seconds": 0.01679, "pixels": 1562500, "bytes": 1562756},
    "npz_item": {"seconds": 0.000147, "pixels": 50176, "bytes": 50176},
}
CPU_GFLOPS = 36.1  # encoder forward on one CPU core (fp32, dinov3-demo-m at 224 px, batch 8), GFLOP/s
# Fixed costs, from the demo sweep measured on an unloaded dev machine (docs ENVIRONMENT.md, 2026-11-28:
# sweeps/demo/xray.yaml, 2 cores: 32 trials in ~70 s on 2 slots, 16 extraction tasks in 90 s of which ~35 s is
# encoder work): a trial's own process, its bootstrap intervals and MLflow record (~4 s); an extraction task's
# start, model build and shard commits (~7 s). `dinoscale calibrate` does not measure them (they come from a
# sweep: benchmarks/bench_plan.py). A GPU node's are of the same order.
TRIAL_FIXED_SECONDS = 4.0
TASK_FIXED_SECONDS = 7.0

# The input kind of each adapter's files when the plan has no data (with data: the manifest's first file says).
DATASET_INPUT = {
    "nih-chestxray14": "png",
    "rsna-pneumonia": "dicom",
    "ct-rate": "nifti_gz",
    "msd": "nifti_gz",
    "autopet": "nifti_gz",
    "hecktor2022": "nifti_gz",
    "cremi": "hdf5",
    "ac3ac4": "hdf5",
    "wsi-tiles": "tile",
    "bcnb": "tile",  # JPEG slides, tiled into PNG tiles once (dinoscale.data.bcnb)
    "medmnist": "npz_item",
    "phantom-xray": "png",
    "semireal-ct": "nifti_gz",
}
READ_MB_S = {"local": 1000.0, "shared": 250.0}  # a node's read rate: local NVMe / a network share (EFS, Filestore)
# Bytes of one input as the dataset is published, where its files compress unlike the calibration's synthetic
# ones (else the calibration's bytes, scaled by pixels): NIH ChestX-ray14 ~42 GB of PNGs / 112,120 images.
PUBLISHED_INPUT_BYTES = {"nih-chestxray14": 42e9 / 112_120}


def load_calibration(path: str | os.PathLike | None = None) -> dict:
    """The CPU table in use: ``DINOSCALE_CALIBRATION`` (a file `dinoscale calibrate` wrote), else the shipped one."""
    path = path or os.environ.get("DINOSCALE_CALIBRATION")
    if path and path != os.devnull and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return {
        "label": CALIBRATION_LABEL,
        "decode": DECODE,
        "cpu_gflops": CPU_GFLOPS,
        "trial_fixed_seconds": TRIAL_FIXED_SECONDS,
        "task_fixed_seconds": TASK_FIXED_SECONDS,
    }


# ---------------------------------------------------------------- the cluster a plan is priced on


@dataclass(frozen=True)
class Cluster:
    """The nodes a sweep runs on: ``workers`` alike nodes (each ``cpus``, ``gpus`` of ``gpu``, ``memory``)."""

    name: str
    workers: int
    cpus: float
    gpus: float
    memory_bytes: float
    gpu: GPU | None = None
    instance: str = ""
    price_on_demand: float | None = None  # $/h per worker
    price_spot: float | None = None
    head_price: float = 0.0  # $/h of a head node that runs no tasks
    boot_minutes: float = 0.0  # billed per worker before its first task
    read_mb_s: float = READ_MB_S["local"]
    storage_gb_month: float | None = None  # the shared store's price
    read_gb: float | None = None  # its price per GB read (EFS Elastic throughput), if it bills reads

    def describe(self) -> str:
        what = f"{self.gpus:g} x {self.gpu.name}" if self.gpu else "no GPU"
        inst = f"{self.instance}, " if self.instance else ""
        return f"{self.name}: {self.workers} x ({inst}{self.cpus:g} CPU, {what}, {self.memory_bytes / 2**30:.0f} GiB)"


def this_machine() -> Cluster:
    return Cluster("this machine", 1, float(os.cpu_count() or 1), 0.0, float(psutil.virtual_memory().total))


def default_launcher() -> Path | None:
    """``cluster/launcher/aws.yaml`` of this checkout (the project's own GPU cluster), if present."""
    p = Path(__file__).resolve().parents[2] / "cluster" / "launcher" / "aws.yaml"
    return p if p.is_file() else None


def cluster_from_launcher(path: Path, costs_path: Path | None = None) -> Cluster:
    """A Ray cluster-launcher YAML (``cluster/launcher/*.yaml``) priced with ``cluster/costs.yaml``: its preferred
    GPU worker type (highest ``priority``), ``max_workers`` of them, the head's price and the boot minutes."""
    try:
        conf = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable cluster-launcher YAML ({type(e).__name__}: {e})") from e
    costs_path = costs_path or Path(path).resolve().parents[1] / "costs.yaml"
    costs = yaml.safe_load(costs_path.read_text()) if costs_path.is_file() else {}
    instances = costs.get("instances", {})
    types = conf.get("available_node_types", {})
    head = types.get(conf.get("head_node_type", "head"), {})
    workers = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0 and t.get("max_workers", 0)]
    if not workers:
        raise UserError(f"{path}: no GPU worker type in available_node_types (resources: {{GPU: n}}, max_workers > 0)")
    w = max(workers, key=lambda t: t.get("priority", 0))
    res = w["resources"]
    acc = next((k.removeprefix("accelerator_type_") for k in res if k.startswith("accelerator_type_")), "")
    inst = _instance(w.get("node_config", {}))
    prices = instances.get(inst, {})
    provider = "gcp" if "gcp" in str(conf.get("provider", {}).get("type", "")) else "aws"
    storage = costs.get("storage", {}).get(provider, {})
    return Cluster(
        name=Path(path).name,
        workers=int(w["max_workers"]),
        cpus=float(res.get("CPU", 1)),
        gpus=float(res["GPU"]),
        memory_bytes=float(prices.get("memory_gb", 32)) * 2**30,
        gpu=GPUS.get(acc),
        instance=inst,
        price_on_demand=prices.get("on_demand"),
        price_spot=prices.get("spot"),
        head_price=instances.get(_instance(head.get("node_config", {})), {}).get("on_demand", 0.0),
        boot_minutes=float(costs.get("boot_minutes", {}).get(provider, 0)),
        read_mb_s=READ_MB_S["shared"],
        storage_gb_month=storage.get("gb_month"),
        read_gb=storage.get("read_gb"),
    )


def _instance(node_config: dict) -> str:
    return str(node_config.get("InstanceType") or node_config.get("machineType") or "")


def plan_cluster(spec, cluster: str | Path | None = None) -> Cluster:
    """The cluster a plan is priced on: ``--cluster`` (a launcher YAML), else for a paper profile the project's
    AWS launcher, else this machine (demo and rehearsal profiles run here)."""
    if cluster is not None:
        return cluster_from_launcher(Path(cluster))
    launcher = default_launcher()
    if spec.profile == "paper" and launcher is not None:
        return cluster_from_launcher(launcher)
    return this_machine()


# ---------------------------------------------------------------- the stages


@dataclass
class StageCost:
    """One stage's work, as one slot of the cluster would do it (seconds), and what bounds it."""

    stage: str  # extraction | trials | fine-tuning
    what: str  # backbone@resolution view, or the probe
    inputs: int = 0  # backbone inputs (extraction) or trials
    flops: float = 0.0
    decode_s: float = 0.0  # decode + preprocess on the task's cores
    compute_s: float = 0.0  # the encoder / the probe on the task's GPU share (or CPU cores)
    disk_s: float = 0.0  # reading the inputs / the features
    fixed_s: float = 0.0  # task / trial start, intervals, record
    read_bytes: float = 0.0
    tasks: int = 1
    overlap: bool = True  # decode, compute and disk run side by side (a GPU loader), else they add (one CPU pool)
    gpu_share: float = 0.0  # GPUs a task holds

    @property
    def seconds(self) -> float:
        parts = (self.decode_s, self.compute_s, self.disk_s)
        return (max(parts) if self.overlap else sum(parts)) + self.fixed_s

    @property
    def bound(self) -> str:
        named = {"decode": self.decode_s, "GPU" if self.gpu_share else "CPU": self.compute_s, "disk": self.disk_s}
        if self.fixed_s > max(named.values()):
            return "fixed"
        return max(named, key=named.get)


@dataclass
class Budget:
    cluster: Cluster
    calibration: str
    extraction: list[StageCost] = field(default_factory=list)
    trials: list[StageCost] = field(default_factory=list)
    disk_bytes: float = 0.0
    warnings: list[str] = field(default_factory=list)
    extraction_slots: int = 1
    trial_slots: int = 1
    feed: list[Feed] = field(default_factory=list)  # the fused passes of the extraction stage and their bound

    @staticmethod
    def wall_of(stages: list[StageCost], slots: int) -> float:
        if not stages:
            return 0.0
        longest = max(s.seconds / max(1, s.tasks) for s in stages)
        return max(sum(s.seconds for s in stages) / max(1, slots), longest)

    @property
    def extraction_wall_s(self) -> float:
        return self.wall_of(self.extraction, self.extraction_slots)

    @property
    def trials_wall_s(self) -> float:
        return self.wall_of(self.trials, self.trial_slots)

    @property
    def boot_s(self) -> float:
        return self.cluster.boot_minutes * 60 if self.cluster.gpu else 0.0

    @property
    def wall_s(self) -> float:
        return self.boot_s + self.extraction_wall_s + self.trials_wall_s

    @property
    def gpu_hours(self) -> float:
        """GPU-hours held (a task holds its GPU share while it decodes too)."""
        if not self.cluster.gpu:
            return 0.0
        return sum(s.seconds * s.gpu_share for s in self.extraction + self.trials) / 3600

    @property
    def read_bytes(self) -> float:
        return sum(s.read_bytes for s in self.extraction)

    def dollars(self, spot: bool) -> float | None:
        """Node-hours at the cluster's prices: the workers the stages keep busy, their boot, the head."""
        c = self.cluster
        price = c.price_spot if spot and c.price_spot is not None else c.price_on_demand
        if price is None:
            return None
        nodes = max(1, c.workers)
        node_hours = (  # slot-hours of each stage over the slots a node holds, + every worker's boot
            sum(s.seconds for s in self.extraction) / 3600 / max(1, self.extraction_slots // nodes)
            + sum(s.seconds for s in self.trials) / 3600 / max(1, self.trial_slots // nodes)
            + c.workers * c.boot_minutes / 60
        )
        return node_hours * price + self.wall_s / 3600 * c.head_price

    def read_dollars(self) -> float | None:
        """The shared store's charge for reading the inputs (each feature set reads them once)."""
        g = self.cluster.read_gb
        return None if g is None else self.read_bytes / 1e9 * g

    def storage_month_dollars(self) -> float | None:
        g = self.cluster.storage_gb_month
        return None if g is None else self.disk_bytes / 1e9 * g


DISK_WARNING_BYTES = 100 * 2**30


def plan_budget(plan, cluster: Cluster, calibration: dict | None = None) -> Budget:
    """The plan's cost on ``cluster``: extraction per feature-set group, trials per cell, bytes, warnings."""
    cal = calibration or load_calibration()
    spec, res = plan.spec, plan.spec.resources
    b = Budget(cluster, cal["label"])
    gpu = cluster.gpu if cluster.gpus else None
    per_node_ext = _per_node(cluster, res.cpus_per_extraction, res.gpus_per_extraction if gpu else 0)
    b.extraction_slots = max(1, cluster.workers * per_node_ext)
    per_node_trial = _per_node(cluster, res.cpus_per_trial, res.gpus_per_trial if gpu else 0)
    b.trial_slots = max(1, cluster.workers * per_node_trial)
    if res.max_concurrent_trials:
        b.trial_slots = min(b.trial_slots, res.max_concurrent_trials)
    kind, pixels = input_kind(plan)
    groups: dict[tuple, list] = {}
    for f in plan.feature_sets:
        if not f.online and (plan.dataset is None or not f.cached):
            groups.setdefault((f.backbone.name, f.resolution, f.view), []).append(f)
    for sets in groups.values():
        b.extraction.append(_extraction(spec, sets, kind, pixels, cal, gpu, cluster.read_mb_s / per_node_ext))
    for c in plan.cells:
        b.trials.append(_trial(spec, plan, c, cal, gpu))
    b.feed = fused_feed(plan, cluster, cal)
    b.disk_bytes = float(sum(f.nbytes for f in plan.feature_sets if not f.online))
    if b.disk_bytes > DISK_WARNING_BYTES:
        b.warnings.append(
            f"{si_bytes(b.disk_bytes)} of features on disk (over {si_bytes(DISK_WARNING_BYTES)}): grid probes can "
            "compute them inside their trials instead (features.online: true, or features.cache_budget_gb: N to "
            "keep only what fits), trading disk for a forward pass per trial"
        )
    return b


@dataclass(frozen=True)
class Feed:
    """One fused extraction pass (``sweep/extraction.py``: its encoders share a device, each file decoded once):
    per input (an image, or a slice of a volume), the seconds of its decode on one core and of every encoder of
    the pass, and the loader processes that keep the encoders fed."""

    backbones: tuple[str, ...]
    decode_s: float  # one decode + resize, one core (the calibration's figure)
    encode_s: float  # the pass's encoders on the task's GPU share (or its CPU cores)
    workers: int  # loader processes (0: decoding inline, on the CPU)
    gpu: bool

    @property
    def bound(self) -> str:
        return "decode" if self.decode_s / max(1, self.workers) > self.encode_s else "encoder"

    @property
    def images_per_second(self) -> float:
        """Inputs per second of the pass: the slower of its decode (over its workers) and its encoders."""
        if not self.gpu:  # one CPU pool: decoding and encoding add up
            return 1.0 / max(self.decode_s + self.encode_s, 1e-12)
        return 1.0 / max(self.decode_s / max(1, self.workers), self.encode_s, 1e-12)


def fused_feed(plan, cluster: Cluster, cal: dict | None = None) -> list[Feed]:
    """The extraction stage's fused passes on ``cluster`` (``cost.fused_groups``: encoders packed per device) and
    their feed: a GPU gets the loader workers its encoders need to keep pace with the decode (measured per core by
    the calibration: ``dinoscale calibrate``; else the shipped table), at most the task's cores less one (the
    driver loop); the bound is whichever of decode and encoders is slower."""
    cal = cal or load_calibration()
    spec, res = plan.spec, plan.spec.resources
    sets = plan.missing if plan.dataset is not None else [f for f in plan.feature_sets if not f.online]
    if not sets:
        return []
    gpu = cluster.gpu if cluster.gpus else None
    device = res.gpu_memory_gib * 2**30  # the spec's planning figure, as the extraction stage packs its passes
    host = res.node_memory_gb * 2**30 if res.node_memory_gb is not None else cluster.memory_bytes
    kind, pixels = input_kind(plan)
    entry = cal["decode"].get(kind) or DECODE[kind]
    out = []
    for g in cost.fused_groups(sets, spec.features.batch_size, device, host):
        group = [f for f in sets if f.backbone.name in g.backbones]
        inputs = {f.split: max(f.n_slices, f.n_images) for f in group}  # decoded once per split, whatever the sets
        total = sum(f.backbone.gflops_per_image(f.resolution) * 1e9 * max(f.n_slices, f.n_images) for f in group)
        flops = total / max(1, sum(inputs.values()))  # every encoder of the pass, per decoded input
        decode_s = entry["seconds"] * pixels / entry["pixels"]  # per image, or per slice of a volume
        if gpu is not None:
            encode_s = flops / (gpu.sustained_flops * res.gpus_per_extraction)
            cap = max(1, min(8, int(res.cpus_per_extraction) - 1))
            workers = max(1, min(cap, math.ceil(decode_s / max(encode_s, 1e-12))))
        else:
            encode_s, workers = flops / (max(cal["cpu_gflops"], 1e-3) * 1e9 * res.cpus_per_extraction), 0
        out.append(Feed(g.backbones, decode_s, encode_s, workers, gpu is not None))
    return out


def _per_node(cluster: Cluster, cpus: float, gpus: float) -> int:
    by_cpu = math.floor(cluster.cpus / cpus) if cpus else 10**6
    by_gpu = math.floor(cluster.gpus / gpus + 1e-9) if gpus else 10**6
    return max(1, min(by_cpu, by_gpu))


def input_kind(plan) -> tuple[str, int]:
    """The decode table's kind of the plan's inputs and their typical pixels (per image, slice or section)."""
    from dinoscale.data import published_size
    from dinoscale.data.readers import file_kind

    spec, ds = plan.spec, plan.dataset
    kind = DATASET_INPUT.get(spec.dataset.name, "png")
    if ds is not None:
        items = ds.sources("train").items or ds.sources("test").items
        first = str(items[0]) if items else ""
        fk = "hdf5" if is_hdf5_ref(first) else file_kind(first) if first else ""
        if fk == "raster":
            kind = "jpeg" if first.lower().endswith((".jpg", ".jpeg")) else "tile" if ds.bagged else "png"
        elif fk in ("dicom", "npz_item", "hdf5"):
            kind = fk
        elif fk == "nifti":
            kind = "nifti_gz"
    if kind == "npz_item" and any(f.view != "images" for f in plan.feature_sets):
        kind = "npz_volume"  # MedMNIST+ 3D: volumes through the volume transform
    pub = plan.published or published_size(spec.dataset.name, spec.dataset.subset)
    if spec.dataset.phantom is not None:
        pixels = spec.dataset.phantom.image_size**2
    elif pub is not None and pub.pixels[0]:
        pixels = pub.pixels[0] * pub.pixels[1]
    else:
        pixels = DECODE[kind]["pixels"]
    return kind, pixels


def _extraction(spec, sets, kind, pixels, cal, gpu, read_mb_s) -> StageCost:
    f0 = sets[0]
    n = sum(max(f.n_slices, f.n_images) for f in sets)
    entry = cal["decode"].get(kind) or DECODE[kind]
    scale = pixels / entry["pixels"]
    cores = spec.resources.cpus_per_extraction
    flops = f0.backbone.gflops_per_image(f0.resolution) * 1e9 * n
    s = StageCost("extraction", f"{f0.backbone.name}@{f0.resolution} {f0.view}", inputs=n, flops=flops)
    s.tasks = max(1, math.ceil(n / spec.features.shard_forward_passes))
    s.decode_s = n * entry["seconds"] * scale / cores
    s.read_bytes = n * PUBLISHED_INPUT_BYTES.get(spec.dataset.name, entry["bytes"] * scale)
    s.disk_s = s.read_bytes / (read_mb_s * 1e6)
    s.fixed_s = s.tasks * cal["task_fixed_seconds"]
    if gpu is not None:
        s.compute_s = flops / gpu.sustained_flops
        s.gpu_share = spec.resources.gpus_per_extraction
    else:  # the encoder on the same cores as the decoding: they add up
        s.compute_s = flops / (max(cal["cpu_gflops"], 1e-3) * 1e9 * cores)
        s.overlap = False
    return s


def _trial(spec, plan, c, cal, gpu) -> StageCost:
    """One cell's trials: the probe's FLOPs (or the encoder's training FLOPs) + the fixed cost of a trial."""
    res = spec.resources
    n_out = len(plan.dataset.classes) if plan.dataset is not None else max(2, len(spec.dataset.classes or []) or 10)
    fixed = cal["trial_fixed_seconds"]
    if c.trains_encoder:
        train = _train_inputs(plan)
        flops = sum(3 * c.gflops_per_image * 1e9 * train * cfg.get("epochs", 1) for cfg in c.configurations)
        s = StageCost("fine-tuning", f"{c.strategy} {c.backbone.name}@{c.resolution}", 1, flops)
        s.fixed_s, share = fixed * len(c.configurations), res.gpus_per_training_trial
    else:
        sets = {
            f.split: f
            for f in plan.feature_sets
            if (f.backbone.name, f.resolution, f.view, f.tokens) == (c.backbone.name, c.resolution, c.view, c.tokens)
        }
        flops, read = _probe_work(c, sets, n_out)
        s = StageCost("trials", c.probe, 1, flops)
        n_trials = int(c.search.get("n_trials", 1) or 1)
        s.flops, s.read_bytes = flops * n_trials, 0.0
        s.disk_s = read * n_trials / (READ_MB_S["local"] * 1e6)  # features re-read each epoch (page cache, else disk)
        s.fixed_s, share = fixed * n_trials, res.gpus_per_trial
        if c.online and sets:  # the encoder runs inside the trial, every epoch / step
            f = next(iter(sets.values()))
            s.flops += f.backbone.gflops_per_image(f.resolution) * 1e9 * sum(x.n_slices for x in sets.values())
    if gpu is not None:
        s.compute_s, s.gpu_share = s.flops / (gpu.sustained_flops * max(share, 1e-3)), share
    else:
        s.compute_s = s.flops / (max(cal["cpu_gflops"], 1e-3) * 1e9 * res.cpus_per_trial)
    return s


def _train_inputs(plan) -> int:
    train = [f for f in plan.feature_sets if f.split == "train"]
    if train:
        return max(train[0].n_slices, train[0].n_images)
    if plan.dataset is not None:
        return int(sum(plan.dataset.sources("train").forward_passes()))
    pub, split = plan.published, plan.spec.dataset.split
    if pub is None:
        return 0
    return round(
        pub.units * pub.inputs_per_unit(plan.spec.dataset.tile_mpp) * (1 - split.val_fraction - split.test_fraction)
    )


def _probe_work(c, sets: dict, n_out: int) -> tuple[float, float]:
    """FLOPs of one trial of the cell's probe and the feature bytes it reads (each epoch / step's crops)."""
    cfg = c.probe_config or {}
    train, others = sets.get("train"), [f for s, f in sets.items() if s != "train"]
    if train is None:
        return 0.0, 0.0
    rows, width = train.n_rows, train.row_elements
    item = train.nbytes / max(1, train.n_rows)
    kind, defn = c.probe, get_probe(c.probe)
    if kind == "knn":
        queries = sum(f.n_rows for f in others)
        return 2.0 * rows * queries * width, float(train.nbytes + sum(f.nbytes for f in others))
    if defn.input == "grid":  # a step budget of random crops + tiled predictions over val and test
        side = max(1, round(math.sqrt(width / max(1, c.backbone.embed_dim))))
        crop_tokens = min(side * side, (max(1, cfg.get("crop", 256) // c.backbone.patch_size)) ** 2)
        hidden = cfg.get("hidden_dim", 64)
        steps = cfg.get("steps", 1000) * cfg.get("batch_size", 8) * cfg.get("crop_depth", 1)
        per_token = c.backbone.embed_dim * hidden * 6
        predict = sum(f.n_rows for f in others) * side * side * per_token / 3
        read = steps * crop_tokens * c.backbone.embed_dim * 2 + sum(f.nbytes for f in others)
        return steps * crop_tokens * per_token + predict, float(read)
    epochs = cfg.get("epochs", 50)
    heads = len(cfg.get("learning_rates", [0])) * len(cfg.get("weight_decays", [0])) or len(cfg.get("cs", [0]) or [0])
    if kind == "logreg":
        return 2.0 * cfg.get("max_iter", 100) * rows * width * n_out * heads, float(train.nbytes)
    hidden = cfg.get("hidden_dim") or cfg.get("attention_dim")
    per_row = width * (hidden + n_out if hidden else n_out) * 6
    return epochs * rows * per_row * heads + 2 * sum(f.n_rows for f in others) * per_row / 3, epochs * rows * item


# ---------------------------------------------------------------- human units


def si(x: float, unit: str = "") -> str:
    """1.2 k, 3.4 M, 5.6 G ... with an SI prefix, three significant digits."""
    for p, f in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def si_bytes(x: float) -> str:
    for p, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= f:
            return f"{x / f:.3g} {p}"
    return f"{x:.0f} B"


def duration(seconds: float) -> str:
    """'2 h 05 min', '7 min', '40 s', '3.2 days'."""
    if seconds >= 48 * 3600:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        h, m = divmod(round(seconds / 60), 60)
        return f"{h} h {m:02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def dollars(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


# ---------------------------------------------------------------- figures quoted in the README and cluster/

COLUMNS = ("spec", "cluster", "wall-clock", "GPU-h", "on demand", "spot", "features", "bound")


def budget_row(plan, b: Budget) -> dict[str, str]:
    """One spec's budget as the README quotes it (``dinoscale plan --markdown``)."""
    work: dict[str, float] = {}
    for s in b.extraction + b.trials:
        work[s.bound] = work.get(s.bound, 0.0) + s.seconds
    return {
        "spec": plan.spec.name,
        "cluster": b.cluster.name + (f" ({b.cluster.workers} x {b.cluster.gpu.name})" if b.cluster.gpu else ""),
        "wall-clock": duration(b.wall_s),
        "GPU-h": f"{b.gpu_hours:.3g}" if b.cluster.gpu else "-",
        "on demand": dollars(b.dollars(spot=False)),
        "spot": dollars(b.dollars(spot=True)),
        "features": si_bytes(b.disk_bytes),
        "bound": max(work, key=work.get) if work else "-",
    }


def markdown_table(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


BLOCK_BEGIN = (
    "<!-- plan-budget:begin (python -m dinoscale.sweep.budget --write: `dinoscale plan` of each paper spec) -->"
)
BLOCK_END = "<!-- plan-budget:end -->"


def paper_budget_block(root: Path, launchers: list[str]) -> str:
    """The figures README.md and cluster/README.md quote: `dinoscale plan` of every paper spec without its data
    (published sizes), priced on each launcher, with the shipped calibration. Deterministic."""

    from dinoscale.sweep.plan import build_plan

    saved = {k: os.environ.pop(k, None) for k in ("DINOSCALE_DATA", "DINOSCALE_CALIBRATION", "DINOSCALE_STORAGE")}
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["DINOSCALE_DATA"] = str(Path(tmp) / "no-data")  # published sizes, whatever is mounted here
            os.environ["DINOSCALE_STORAGE"] = str(Path(tmp) / "store")
            specs = [load_spec(p) for p in sorted((root / "sweeps").glob("*.yaml"))]
            for spec in (s for s in specs if s.profile == "paper"):
                plan = build_plan(spec, Path(tmp))
                for launcher in launchers:
                    cluster = cluster_from_launcher(root / launcher)
                    rows.append(budget_row(plan, plan_budget(plan, cluster, load_calibration(path=os.devnull))))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    gpus = sorted({GPUS[g].name for g in GPUS if any(f"x {g})" in r["cluster"] for r in rows)})
    note = (
        f"Data-less plans (published dataset sizes), every worker busy, spot and on-demand prices of "
        f"`cluster/costs.yaml`; encoder at {UTILISATION:g} x the dense bf16 peak of "
        + ", ".join(f"{g} ({GPUS[g].bf16_tflops:g} TFLOP/s)" for g in gpus)
        + f"; decoding {CALIBRATION_LABEL}. `dinoscale plan SPEC --cluster LAUNCHER` shows the stages."
    )
    return "\n".join([BLOCK_BEGIN, markdown_table(rows), "", note, BLOCK_END])


def replace_block(text: str, block: str) -> str:
    a, b = text.index(BLOCK_BEGIN), text.index(BLOCK_END) + len(BLOCK_END)
    return text[:a] + block + text[b:]


README_LAUNCHERS = {
    "README.md": ["cluster/launcher/aws.yaml"],
    "cluster/README.md": ["cluster/launcher/aws.yaml", "cluster/launcher/gcp.yaml"],
}


# ---------------------------------------------------------------- calibration against what ran

# Logged on the parent run beside what the runner measures (extraction_wall_seconds, trials_wall_seconds)
PREDICTED_EXTRACTION = "predicted_extraction_wall_seconds"
PREDICTED_TRIALS = "predicted_trials_wall_seconds"
PREDICTED_GPU_HOURS = "predicted_gpu_hours"
MEASURED = {PREDICTED_EXTRACTION: "extraction_wall_seconds", PREDICTED_TRIALS: "trials_wall_seconds"}


def predicted_metrics(plan, address: str | None = None) -> dict[str, float]:
    """The plan's prediction of each stage on the cluster it runs on (this machine without a Ray address)."""
    try:
        b = plan_budget(plan, this_machine() if address is None else plan_cluster(plan.spec))
    except Exception:  # a prediction never stops a sweep (e.g. a launcher YAML that does not parse)
        return {}
    return {
        PREDICTED_EXTRACTION: b.extraction_wall_s,
        PREDICTED_TRIALS: b.trials_wall_s,
        PREDICTED_GPU_HOURS: b.gpu_hours,
    }


if __name__ == "__main__":  # python -m dinoscale.sweep.budget --write: regenerate the quoted figures
    import sys

    root = Path(__file__).resolve().parents[2]
    for name, launchers in README_LAUNCHERS.items():
        path = root / name
        new = replace_block(path.read_text(), paper_budget_block(root, launchers))
        if "--write" in sys.argv:
            path.write_text(new)
            print(f"written {path}")
        else:
            print(new[new.index(BLOCK_BEGIN) : new.index(BLOCK_END) + len(BLOCK_END)])
