"""Terminal output: the demo banner, the plan and the final summary (rich tables)."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

from dinoscale import record
from dinoscale.console import console
from dinoscale.data.splits import TRAIN_SIZE_UNITS, replicate_indices, train_size_label
from dinoscale.headline import AUROC
from dinoscale.provenance import Provenance
from dinoscale.record import AXIS_NAMES
from dinoscale.sweep.budget import UTILISATION, dollars, duration, plan_budget, plan_cluster, si, si_bytes
from dinoscale.sweep.cost import gib
from dinoscale.sweep.plan import Plan


def print_banner(plan: Plan, provenance: Provenance | None = None) -> None:
    spec = plan.spec
    provenance = provenance or plan.provenance()
    title = f"dinoscale sweep '{spec.name}' - {spec.modality}, {spec.profile} profile"
    body = "\n".join(provenance.lines())
    if provenance.headline:
        body = f"[bold]{provenance.headline}[/bold]\n" + body
    style = "magenta" if provenance.rehearsal else "yellow" if provenance.demo else "green"
    console.print(Panel(body, title=title, border_style=style))


def _unit_name(plan: Plan, view: str) -> str:
    ds, pub = plan.dataset, plan.published
    if (ds is not None and ds.bagged) or (pub is not None and pub.bagged):
        return "tiles"
    if view == "images":
        return "images"
    return "volumes"


def _table(title: str, columns: dict[str, str]) -> Table:
    """A borderless table: its columns fit 80 (tests/test_plan_budget.py), its title wraps."""
    t = Table(title=title, title_justify="left", padding=(0, 1), pad_edge=False, box=None, header_style="bold")
    for name, justify in columns.items():
        t.add_column(name, justify=justify)
    return t


def print_plan(plan: Plan, budget=None) -> None:
    """The plan as a budget: its feature sets, the stages with their bound, wall-clock on a named cluster,
    GPU-hours, dollars, bytes, memory against the cluster's nodes (every offending task)."""

    spec = plan.spec
    budget = budget or plan_budget(plan, plan_cluster(spec))
    est = "~" if plan.dataset is None else ""
    groups: dict = {}
    for fs in plan.feature_sets:
        groups.setdefault((fs.backbone.name, fs.resolution, fs.view, fs.tokens), []).append(fs)
    n_cached = len([f for f in plan.feature_sets if f.cached])
    n_online = len([f for f in plan.feature_sets if f.online])
    t = _table(
        f"Feature sets: one forward pass per backbone x resolution x view x split; {n_cached} cached, "
        f"{len(plan.missing)} to extract" + (f", {n_online} online" if n_online else ""),
        {
            "feature set": "left",
            "view": "left",
            "inputs": "right",
            "on disk": "right",
            "shards": "right",
            "status": "left",
        },
    )
    trial_ram: dict = {}
    for c in plan.cells:
        if c.memory.get("predicted_peak_bytes"):
            k = (c.backbone.name, c.resolution, c.view, c.tokens)
            trial_ram[k] = max(trial_ram.get(k, 0.0), c.memory["predicted_peak_bytes"])
    m = _table(
        "Host memory, predicted peak of one task",
        {"feature set": "left", "view": "left", "extraction task RAM": "right", "trial RAM (largest)": "right"},
    )
    for (name, res, view, tokens), sets in groups.items():
        t.add_row(
            f"{name}@{res}",
            view + (" grid" if tokens == "patch_grid" else ""),
            est + si(sum(f.n_slices or f.n_images for f in sets)) + f" {_input_name(plan, view)}",
            est + si_bytes(sum(f.nbytes for f in sets)) if not sets[0].online else "online",
            str(sum(f.n_shards for f in sets)),
            _status(sets),
        )
        m.add_row(
            f"{name}@{res}",
            view,
            est + si_bytes(max(f.extraction_peak for f in sets)),
            est + si_bytes(trial_ram[(name, res, view, tokens)]) if (name, res, view, tokens) in trial_ram else "-",
        )
    console.print(t)
    if plan.dataset is None and plan.published is not None:
        console.print(
            f"  [dim]counts from the published dataset size: {plan.published.describe(spec.dataset.tile_mpp)}"
            + (f"; {plan.published.source}" if plan.published.source else "")
            + "[/dim]"
        )
    _print_stages(plan, budget)
    console.print(m)
    axes = (
        f"{len(spec.backbones)} backbones x {len(spec.resolutions)} resolutions x {len(spec.probes)} probes x "
        f"{len(spec.strategies)} strategies x {len(spec.seeds)} seeds"
        + (f" x {len(spec.train_size.values)} training-set sizes" if spec.train_size else "")
    )
    training = [c for c in plan.cells if c.trains_encoder]
    n_trials = sum(len(c.unit_ids) for c in plan.cells)
    console.print(
        f"[bold]Trials:[/bold] {len(plan.cells)} cells ({axes}), {n_trials} Ray Tune trials"
        + (" (one per frozen cell, one per lora / full configuration)" if training else ", one per cell")
    )
    console.print(f"  [dim]order: {_order_words(plan)}[/dim]")
    if spec.train_size is not None:
        console.print(f"  [dim]{train_size_words(plan)}[/dim]")
    if training:
        print_finetuning(plan, training)
    _print_budget(plan, budget)
    _print_memory(plan, budget)
    if plan.dataset_error:
        console.print(f"[red]Data not available[/red] - the plan is shown without cache status:\n{plan.dataset_error}")


def train_size_words(plan: Plan) -> str:
    """The training-set-size axis in a line: the sizes, the patients each keeps of replicate 0's train patients
    (where the data is there to count), and what they cost."""
    ts = plan.spec.train_size
    sizes = ", ".join(train_size_label(ts.unit, v) for v in ts.values)
    counts = ""
    if plan.dataset is not None:
        cell = next(c for c in plan.cells if c.seed == plan.spec.seeds[0])
        train, val = plan.dataset.units("train"), plan.dataset.units("val")
        y = np.concatenate([train.labels, val.labels])
        n = []
        for v in ts.values:
            rep = {**cell.replicate, "train": {**cell.replicate["train"], "value": float(v)}}
            tr, _ = replicate_indices(train.patient_ids, val.patient_ids, rep, train.folds, val.folds, labels=y)
            pids = np.concatenate([train.patient_ids, val.patient_ids])[tr]
            n.append(str(len(set(pids))))
        counts = f" = {', '.join(n)} train patients (replicate {cell.seed})"
    return (
        f"training-set sizes ({TRAIN_SIZE_UNITS[ts.unit]}): {sizes}{counts}; drawn per replicate by patient, "
        "stratified by label, nested; val and test fixed; features shared by every size (probe fits only)"
    )


def _order_words(plan: Plan) -> str:
    """The order the cells run in (``resources.cell_order``), with the first few."""
    first = ", ".join(c.id for c in plan.cells[:3]) + (", ..." if len(plan.cells) > 3 else "")
    if plan.spec.resources.cell_order == "grid":
        return f"the spec's grid order ({first})"
    return (
        f"cheapest first, one replicate of every cell before the next, so a sweep stopped halfway has whole "
        f"curves ({first}; resources.cell_order: grid for the spec's order)"
    )


def _input_name(plan: Plan, view: str) -> str:
    unit = _unit_name(plan, view)
    return {"volumes": "slices", "images": "images", "tiles": "tiles"}.get(unit, unit)


def _status(sets) -> str:
    cached = sum(f.cached for f in sets)
    shards = sum(f.n_shards for f in sets)
    committed = sum(f.committed_shards for f in sets)
    if sets[0].online:
        return "[cyan]online[/cyan]"
    if sets[0].key is None:
        return "[red]no data[/red]"
    if cached == len(sets):
        return "[green]cached[/green]"
    kept = f" ({committed}/{shards} kept)" if committed else ""
    return f"[yellow]extract {len(sets) - cached}/{len(sets)}[/yellow]{kept}"


def _print_stages(plan: Plan, b) -> None:
    """Per feature set to extract: the slot time of decoding, the encoder and the reads, and the bound."""

    gpu = b.cluster.gpu if b.cluster.gpus else None
    enc = f"{gpu.name} x {UTILISATION:g}" if gpu else "CPU"
    t = _table(
        f"Extraction time on {b.cluster.name}: each feature set's tasks in one slot",
        {
            "feature set": "left",
            "FLOP": "right",
            "decode": "right",
            f"encoder ({enc})": "right",
            "read": "right",
            "bound": "left",
        },
    )
    for s in b.extraction:
        t.add_row(
            s.what.split(" ")[0], si(s.flops), duration(s.decode_s), duration(s.compute_s), duration(s.disk_s), s.bound
        )
    if b.extraction:
        console.print(t)
    _print_feed(b)


def _print_feed(b) -> None:
    """The fused passes of the extraction stage: each file decoded once per pass (one pass where the encoders fit
    one device, else the plan says how it splits them), the loader workers and what bounds the pass."""
    if not b.feed:
        return
    n = len(b.feed)
    console.print(
        "  [dim]fused extraction: "
        + (
            "every encoder in one pass, each file decoded once"
            if n == 1
            else f"encoders split into {n} passes (they do not fit one device together): each file decoded {n} times"
        )
        + "[/dim]"
    )
    for f in b.feed:
        workers = f"{f.workers} loader worker(s)" if f.gpu else "decoding inline on the CPU"
        console.print(
            f"  [dim]  {' + '.join(f.backbones)}: decode {f.decode_s * 1e3:.3g} ms / input (one core), encoders "
            f"{f.encode_s * 1e3:.3g} ms / input, {workers}: {f.bound}-bound, ~{si(f.images_per_second)} inputs/s[/dim]"
        )


def _print_budget(plan: Plan, b) -> None:
    c = b.cluster
    t = _table(
        f"Budget on {c.describe()}",
        {"stage": "left", "work (slot-h)": "right", "bound": "left", "wall-clock": "right", "GPU-h": "right"},
    )
    by_stage: dict[str, list] = {}
    for s in b.extraction + b.trials:
        by_stage.setdefault(s.stage, []).append(s)
    if b.boot_s:
        t.add_row("node boot", "-", "-", duration(b.boot_s), "-")
    for stage, items in by_stage.items():
        bounds: dict[str, float] = {}
        for s in items:
            bounds[s.bound] = bounds.get(s.bound, 0.0) + s.seconds
        slots = b.extraction_slots if stage == "extraction" else b.trial_slots
        gpu_h = sum(s.seconds * s.gpu_share for s in items) / 3600 if c.gpu else 0.0
        t.add_row(
            f"{stage} ({len(items)})",
            f"{sum(s.seconds for s in items) / 3600:.3g}",
            max(bounds, key=bounds.get),
            duration(b.wall_of(items, slots)),
            f"{gpu_h:.3g}" if c.gpu else "-",
        )
    t.add_row(
        "[bold]total[/bold]",
        "",
        "",
        f"[bold]{duration(b.wall_s)}[/bold]",
        f"[bold]{b.gpu_hours:.3g}[/bold]" if c.gpu else "-",
    )
    console.print(t)
    console.print(
        "  [dim]bound: decode = the task's CPU cores decoding + resizing its inputs "
        f"({b.calibration}); GPU = FLOPs measured on each model / (dense bf16 peak x {UTILISATION:g}); "
        "CPU = the encoder or probe on the task's cores; disk = its inputs at the node's read rate; fixed = a "
        "task's / trial's start, intervals and record. Wall-clock spreads the work over "
        f"{b.extraction_slots} extraction and {b.trial_slots} trial slots.[/dim]"
    )
    if c.gpu:
        console.print(f"  [dim]{c.gpu.name}: {c.gpu.source}[/dim]")
    else:
        console.print(
            "  [dim]no GPU here: priced on this machine; `--cluster cluster/launcher/aws.yaml` for a GPU cluster[/dim]"
        )
    spot, on_demand = b.dollars(spot=True), b.dollars(spot=False)
    if on_demand is not None:
        console.print(
            f"[bold]Cost:[/bold] {dollars(on_demand)} on demand, {dollars(spot)} spot "
            f"({c.instance} workers at {dollars(c.price_on_demand)}/h, spot {dollars(c.price_spot)}/h, + head and "
            f"{c.boot_minutes:g} min boot each; prices: cluster/costs.yaml)"
        )
    store = b.storage_month_dollars()
    n_shards = sum(f.n_shards for f in plan.feature_sets if not f.online)
    console.print(
        f"[bold]Store:[/bold] {'~' if plan.dataset is None else ''}{si_bytes(b.disk_bytes)} of features in "
        f"{n_shards} shard(s) ({plan.spec.features.dtype})"
        + (f", {dollars(store)}/month on the shared store" if store is not None else "")
        + (f"; inputs read: {si_bytes(b.read_bytes)}" if b.read_bytes else "")
        + (f" ({dollars(b.read_dollars())} of reads)" if b.read_bytes and b.read_dollars() is not None else "")
        + f"; trials hold up to {plan.spec.features.resident_mb:,} MiB of a split in memory and stream larger ones"
    )
    for w in b.warnings:
        console.print(f"[yellow]Warning:[/yellow] {w}")


def _print_memory(plan: Plan, b) -> None:
    """Every task that would not fit a node of the cluster (its memory, or resources.node_memory_gb)."""
    from dinoscale.sweep.plan import memory_problems

    if plan.spec.resources.node_memory_gb is not None:
        node, how = plan.spec.resources.node_memory_gb * 2**30, "resources.node_memory_gb"
    else:
        node, how = (
            b.cluster.memory_bytes,
            f"a node of {b.cluster.name}" + (f" ({b.cluster.instance})" if b.cluster.instance else ""),
        )
    problems = memory_problems(plan, node)
    if problems:
        console.print(
            f"[red]Memory:[/red] {len(problems)} task(s) would not fit the {gib(node)} of {how}; a sweep would be "
            "refused:\n  " + "\n  ".join(problems)
        )


def print_finetuning(plan: Plan, cells) -> None:
    """Per lora / full cell: the configurations it searches and how its trials fit in GPU memory."""
    spec = plan.spec
    es = spec.finetuning.early_stopping
    stop = (
        f"ASHA within each cell (grace {es.grace_epochs} epoch(s), top 1/{es.reduction_factor:g} continue at each rung)"
        if es.enabled
        else "no early stopping (every configuration to its last epoch)"
    )
    t = Table(title=f"Fine-tuning cells: configurations searched on val, {stop}")
    for col in ("cell", "configurations", "epochs", "batch", "est. GPU GiB", "grad ckpt", "micro-batch"):
        t.add_column(col, justify="left" if col == "cell" else "right")
    for c in cells:
        p = c.params
        fits = "" if p["train.fits_gpu_memory"] else " [red](does not fit)[/red]"
        t.add_row(
            c.id,
            str(len(c.configurations)),
            str(c.configurations[0]["epochs"]),
            str(c.configurations[0]["batch_size"]),
            f"{p['train.est_gpu_gib']:.2f}{fits}",
            "on" if p["train.grad_checkpointing"] else "off",
            str(p["train.micro_batch_size"]),
        )
    console.print(t)
    console.print(
        f"  GPU memory per training trial estimated for a {spec.resources.gpu_memory_gib:g} GiB GPU "
        "(resources.gpu_memory_gib): activations measured on the meta device at the cell's resolution and batch"
    )


def _with_ci(value, low, high) -> str:
    if low is None or high is None or low != low or high != high:  # no interval (too few test units)
        return f"{value:.3f} (no interval)"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _axis_text(name: str, value) -> str:
    return f"{value / 1e6:.2f}M" if name == "n_params" else str(value)


def print_summary(rows: list[dict], title: str, headline=None) -> None:
    """One row per cell: the grid axes that vary in this sweep, the headline with its interval, the val
    metric it was selected on and what was selected."""

    headline = headline or AUROC
    if len(rows) > 12 and len({r.get("resolution") for r in rows}) > 1:
        _print_grid(rows, title, headline)
        print_selection_warnings(rows)
        return
    axes = [a for a in AXIS_NAMES if len({r.get(a) for r in rows}) > 1 or a in ("backbone", "resolution", "probe")]
    t = Table(title=title)
    per_group = any(r.get("per_group") for r in rows)  # e.g. CREMI samples A / B / C, reported separately
    extra = ("per sample",) if per_group else ()
    for col in (*axes, f"{headline.test} [95% CI]", *extra, "val", "selected", "state"):
        t.add_column({"n_params": "params", "resolution": "res"}.get(col, col))
    for r in sorted(
        rows,
        key=lambda r: tuple(
            str(r.get(a)) if not isinstance(r.get(a), (int, float)) else r.get(a)
            for a in ("probe", "strategy", "resolution", "n_params", "seed")
        ),
    ):
        if r.get("state") == "FINISHED":
            value = _with_ci(r["metric"], *(r[k] for k in record.METRIC_CI))
            val = f"{r['val_metric']:.3f}"
        else:
            value, val = "-", "-"
        groups = (r.get("per_group", ""),) if per_group else ()
        t.add_row(
            *(_axis_text(a, r.get(a)) for a in axes), value, *groups, val, r.get("selected", ""), r.get("state", "?")
        )
    console.print(t)
    print_selection_warnings(rows)


def print_selection_warnings(rows: list[dict]) -> None:
    """Cells whose choice on val sits on the edge of its grid: the optimum may lie outside it."""
    edged = [r for r in rows if r.get("state") == "FINISHED" and r.get("selection_edge")]
    if edged:
        console.print(
            f"[yellow]Warning: {len(edged)} cell(s) chose a hyper-parameter on the edge of its grid "
            "(the optimum may lie outside it; widen the grid in the spec):[/yellow]"
        )
        for r in edged:
            console.print(f"  [yellow]{r['cell']}: {r['selection_edge']}[/yellow]")
    no_ci = [r for r in rows if r.get("state") == "FINISHED" and r.get("interval_note")]
    if no_ci:
        console.print(f"[yellow]{len(no_ci)} cell(s) without an interval: {no_ci[0]['interval_note']}[/yellow]")


def _print_grid(rows: list[dict], title: str, headline) -> None:
    """A large sweep on one screen: one row per (other varying axes, backbone), one column per resolution;
    what was selected per cell is in its MLflow run. Cells that did not finish are listed below."""
    keys = [a for a in AXIS_NAMES if a not in ("resolution", "n_params") and len({r.get(a) for r in rows}) > 1]
    keys = [k for k in keys if k != "backbone"] + ["backbone"]
    resolutions = sorted({r.get("resolution") for r in rows}, key=lambda v: (not isinstance(v, (int, float)), v))
    t = Table(title=title, caption=f"{headline.test} [95% CI] per cell; selected hyper-parameters: MLflow")
    for k in keys:
        t.add_column(k)
    for res in resolutions:
        t.add_column(f"{res}px", justify="right")
    grid: dict[tuple, dict] = {}
    for r in rows:
        grid.setdefault(tuple(r.get(k) for k in keys), {})[r.get("resolution")] = r
    order = sorted(
        grid,
        key=lambda key: (
            tuple((str(v) if k != "backbone" else "") for k, v in zip(keys, key))
            + (min(r.get("n_params") or 0 for r in grid[key].values()),)
        ),
    )
    for key in order:
        cells = grid[key]
        values = []
        for res in resolutions:
            r = cells.get(res)
            if r is None:
                values.append("")
            elif r.get("state") == "FINISHED":
                values.append(_with_ci(r["metric"], *(r[k] for k in record.METRIC_CI)))
            else:
                values.append(f"[red]{r.get('state', '?')}[/red]")
        t.add_row(*(str(v) for v in key), *values)
    console.print(t)
    failed = [r for r in rows if r.get("state") != "FINISHED"]
    for r in failed:
        console.print(
            f"[red]{r.get('state', '?')}[/red]: " + ", ".join(f"{a}={_axis_text(a, r.get(a))}" for a in AXIS_NAMES)
        )


_CURRENT: SweepProgress | None = None  # the live cell table of the sweep this driver runs (one at a time)


def progress_event(cell: str, state: str, result: dict | None = None) -> None:
    """Tell the driver's cell table (if one is open) that ``cell`` changed state. Called from Ray Tune's
    callbacks, which Tune pickles into its experiment state: they hold no console, only call this."""
    if _CURRENT is not None and cell in _CURRENT.cells:
        _CURRENT.update(cell, state, result)


class SweepProgress:
    """Live table of cells (state, test headline metric, elapsed) with a progress bar on a terminal;
    one line per finished cell in logs and CI. Opened, it is the driver's current table
    (``progress_event``); nothing of it is handed to Ray."""

    def __init__(self, cell_ids: list[str], headline=None):
        self.metric = (headline or AUROC).test
        self._time = time.perf_counter
        self.cells = {c: {"state": "PENDING", "auroc": "", "started": None, "elapsed": ""} for c in cell_ids}
        self.done = 0
        self.live = None

    def __enter__(self):
        global _CURRENT
        if console.is_terminal:
            self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        _CURRENT = self
        return self

    def __exit__(self, *exc):
        global _CURRENT
        _CURRENT = None
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def update(self, cell: str, state: str, result: dict | None = None) -> None:
        row = self.cells[cell]
        if state == "RUNNING" and row["started"] is None:
            row["started"] = self._time()
        if state in ("FINISHED", "FAILED"):
            self.done += 1
            if row["started"] is not None:
                row["elapsed"] = f"{self._time() - row['started']:.1f}s"
        m = self.metric
        if result and result.get(m) is not None:
            row["auroc"] = _with_ci(result[m], *(result.get(k) for k in record.ci_names(m)))
        row["state"] = state
        if self.live is not None:
            self.live.update(self._render())
        elif state in ("FINISHED", "FAILED", "RETRYING"):
            colour = {"FINISHED": "", "FAILED": "[red]", "RETRYING": "[yellow]"}[state]
            detail = (
                f"{self.metric} {row['auroc']}"
                if state == "FINISHED"
                else state + (" (traceback in its MLflow run)" if state == "FAILED" else "")
            )
            console.print(f"  [{self.done}/{len(self.cells)}] {colour}{cell}: {detail}")

    def _render(self):
        t = Table(title="cells")
        for col in ("cell", "state", f"{self.metric} [95% CI]", "elapsed"):
            t.add_column(col)
        colours = {"FINISHED": "green", "FAILED": "red", "RUNNING": "cyan", "RETRYING": "yellow", "PENDING": "dim"}
        for cell, row in self.cells.items():
            elapsed = row["elapsed"] or (f"{self._time() - row['started']:.0f}s" if row["started"] else "")
            t.add_row(cell, f"[{colours[row['state']]}]{row['state']}[/]", row["auroc"], elapsed)
        bar = ProgressBar(total=len(self.cells), completed=self.done, width=60)
        return Group(t, bar, f"{self.done}/{len(self.cells)} cells done")


def extraction_unit(plan: Plan) -> str:
    """What one stored row of the extraction stage is, in the dataset's words (the bar's unit)."""
    views = {f.view for f in plan.missing} or {"images"}
    if views == {"images"}:
        return _unit_name(plan, "images")
    if views == {"volumes"}:
        return "volumes"
    if views == {"slices"}:
        return "sections" if plan.spec.modality == "em" else "slices"
    return "items (images / slices / volumes)"


class ExtractionProgress:
    """Rows extracted so far, fed by the extraction tasks (``run_extraction_stage(on_progress=...)``): a bar
    with the rate in the dataset's unit and an ETA on a terminal; in logs a line every ``every`` seconds."""

    def __init__(self, unit: str, every: float = 30.0):
        self.unit, self.every, self._time = unit, every, time.monotonic
        self.bar: Progress | None = None
        self._task = None
        self._t0 = self._last_line = self._time()
        self._done = self._total = 0

    def __enter__(self):
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]extraction[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                refresh_per_second=2,
            )
            self.bar.__enter__()
            self._task = self.bar.add_task("extraction", total=None, rate="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def rate(self) -> float:
        elapsed = self._time() - self._t0
        return self._done / elapsed if elapsed > 0 else 0.0

    def __call__(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        rate = self.rate()
        if self.bar is not None:
            self.bar.update(self._task, completed=done, total=total, rate=f"{rate:,.1f} {self.unit}/s")
        elif self._time() - self._last_line >= self.every and done < total:
            self._last_line = self._time()
            speed = (
                f"{rate:,.1f} {self.unit}/s, ETA {_duration((total - done) / rate)}"
                if rate > 0
                else "the workers are starting"
            )
            console.print(f"  extraction: {done:,}/{total:,} {self.unit} ({100 * done / max(total, 1):.0f}%), {speed}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
