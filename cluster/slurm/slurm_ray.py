"""Helpers of the Slurm path (cluster/slurm/dinoscale.sbatch, `make slurm-submit`).

    python cluster/slurm/slurm_ray.py options SPEC [--nodes N] [--gpus G] [--cpus C] [--mem-gb M] [--time T] ...
        the sbatch options for SPEC, one per line: its resources turned into --gres/--cpus-per-task/--mem
    python cluster/slurm/slurm_ray.py resume SPEC
        prints --resume when SPEC has an unfinished sweep under its storage path (DINOSCALE_STORAGE
        or storage.path, relative to the current folder), nothing when it has none or it finished
    python cluster/slurm/slurm_ray.py wait-nodes ADDRESS N [--timeout S]
        waits until N Ray nodes are alive at ADDRESS (token auth from the environment)

A mistake (no such spec, a spec that does not validate, too few nodes) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from dinoscale.errors import UserError
from dinoscale.spec import SweepSpec, load_spec
from dinoscale.sweep.plan import storage_root
from dinoscale.sweep.state import SweepState

RAY_OVERHEAD_GIB = 3  # raylet, GCS, dashboard and the driver on the head node
CPU_ONLY_CONCURRENT_TASKS = 4  # a CPU-only allocation without --cpus: room for this many tasks at once
MIN_MEM_GIB = 4


def cpus_per_node(spec: SweepSpec, gpus: int) -> int:
    """CPUs a node needs so that all its GPUs are busy: one extraction task per `gpus_per_extraction`
    share, one trial per `gpus_per_trial` share (per `gpus_per_training_trial` for lora/full), each
    with its CPUs. Without GPUs: the embedded-Ray CPU count of the spec (`ray.num_cpus`), else room
    for a few tasks."""
    r = spec.resources
    if gpus <= 0:
        if spec.ray.num_cpus:
            return spec.ray.num_cpus
        return math.ceil(max(r.cpus_per_extraction, r.cpus_per_trial) * CPU_ONLY_CONCURRENT_TASKS)
    needs = []
    if r.gpus_per_extraction > 0:
        needs.append(math.floor(gpus / r.gpus_per_extraction) * r.cpus_per_extraction)
    trial_share = r.gpus_per_training_trial if any(s != "frozen" for s in spec.strategies) else r.gpus_per_trial
    if trial_share > 0:
        needs.append(math.floor(gpus / trial_share) * r.cpus_per_trial)
    return max(1, math.ceil(max(needs, default=max(r.cpus_per_extraction, r.cpus_per_trial))))


def mem_gib_per_node(spec: SweepSpec, cpus: int) -> int:
    """`resources.node_memory_gb` when the spec states it; else the plan's largest predicted task peak
    times the tasks that fit on the node's CPUs, plus Ray's own processes."""
    r = spec.resources
    if r.node_memory_gb is not None:
        return math.ceil(r.node_memory_gb)
    from dinoscale.sweep.plan import build_plan  # builds the whole plan: only when memory is not stated

    plan = build_plan(spec, Path.cwd())
    peaks = [fs.extraction_peak for fs in plan.feature_sets] + [
        c.memory.get("predicted_peak_bytes", 0.0) for c in plan.cells
    ]
    tasks = max(1, math.floor(cpus / min(r.cpus_per_trial, r.cpus_per_extraction)))
    need = max(peaks, default=0.0) * tasks / 2**30 + RAY_OVERHEAD_GIB
    return max(MIN_MEM_GIB, math.ceil(need))


def sbatch_options(spec: SweepSpec, a: argparse.Namespace) -> list[str]:
    gpus = a.gpus if a.gpus is not None else (0 if spec.profile == "demo" else 1)
    cpus = a.cpus or cpus_per_node(spec, gpus)
    mem = a.mem_gb or mem_gib_per_node(spec, cpus)
    opts = [
        f"--job-name=dinoscale-{spec.name}",
        f"--nodes={a.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus}",
        f"--mem={mem}G",
        f"--time={a.time}",
        # the batch shell gets SIGTERM this long before the time limit; it stops the sweep cleanly
        f"--signal=B:TERM@{a.signal_lead}",
    ]
    if gpus > 0:
        opts.append(f"--gres=gpu:{gpus}")
    opts += [f"--partition={a.partition}"] if a.partition else []
    opts += [f"--account={a.account}"] if a.account else []
    opts += [f"--output={a.output}"] if a.output else []
    return opts


def resume_flag(spec: SweepSpec) -> str:
    state = SweepState.load_latest(storage_root(spec.storage, Path.cwd()), spec.name)
    if state is None or state.status == "finished":
        return ""
    if state.spec_digest != spec.digest():
        print(
            f"sweep {state.sweep_id} of '{spec.name}' is unfinished but the spec changed since; resuming it will be "
            "refused: submit with RESUME=0 to start a new sweep",
            file=sys.stderr,
        )
    return "--resume"


def wait_nodes(address: str, n: int, timeout: float) -> None:
    import ray  # imported here: the other subcommands run without Ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    deadline = time.time() + timeout
    alive = 0
    while time.time() < deadline:
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        if alive >= n:
            print(f"{alive} Ray node(s) alive at {address}")
            return
        time.sleep(1)
    raise UserError(f"only {alive} of {n} Ray nodes joined {address} within {timeout:.0f}s: see the job's log")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slurm_ray.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("options")
    o.add_argument("spec", type=Path)
    o.add_argument("--nodes", type=int, default=1)
    o.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: 0 for demo specs, else 1)")
    o.add_argument("--cpus", type=int, default=None, help="CPUs per node (default: from the spec's resources)")
    o.add_argument("--mem-gb", type=int, default=None, help="memory per node (default: from the spec)")
    o.add_argument("--time", default="24:00:00")
    o.add_argument("--signal-lead", type=int, default=180, help="seconds before the time limit to stop cleanly")
    o.add_argument("--partition", default="")
    o.add_argument("--account", default="")
    o.add_argument("--output", default="")
    r = sub.add_parser("resume")
    r.add_argument("spec", type=Path)
    w = sub.add_parser("wait-nodes")
    w.add_argument("address")
    w.add_argument("n", type=int)
    w.add_argument("--timeout", type=float, default=300)
    a = p.parse_args(argv)
    try:
        if a.cmd == "options":
            print("\n".join(sbatch_options(load_spec(a.spec), a)))
        elif a.cmd == "resume":
            print(resume_flag(load_spec(a.spec)))
        else:
            wait_nodes(a.address, a.n, a.timeout)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
