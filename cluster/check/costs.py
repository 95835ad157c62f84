"""Prices of the launcher clusters, from cluster/costs.yaml (the one place for prices) and the
launcher YAMLs; renders the cost table of cluster/README.md and prints what Ray would launch.

    python cluster/check/costs.py            the README's cost table, as it should read
    python cluster/check/costs.py --write    rewrite that table in cluster/README.md
    python cluster/check/costs.py --ray      what Ray's node selection launches for each paper profile
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1]
ROOT = CLUSTER.parent
README = CLUSTER / "README.md"
BEGIN, END = "<!-- cost-table:begin (cluster/check/costs.py --write) -->", "<!-- cost-table:end -->"
CLOUDS = {"aws": "AWS", "gcp": "GCP"}
PEAK_SPOT = "peak $/h, spot workers"
PEAK_FALLBACK = "peak $/h, spot unavailable"


def load_costs() -> dict:
    return yaml.safe_load((CLUSTER / "costs.yaml").read_text())


def load_launcher(cloud: str) -> dict:
    return yaml.safe_load((CLUSTER / "launcher" / f"{cloud}.yaml").read_text())


def instance_type(node_config: dict) -> str:
    return node_config.get("InstanceType") or node_config["machineType"]


def is_spot(node_config: dict) -> bool:
    market = (node_config.get("InstanceMarketOptions") or {}).get("MarketType", "")
    sched = node_config.get("scheduling") or {}
    return market.lower() == "spot" or sched.get("provisioningModel") == "SPOT" or bool(sched.get("preemptible"))


def disk_per_hour(node_config: dict, costs: dict) -> float:
    """Boot disks: EBS BlockDeviceMappings (AWS) or disks[].initializeParams (GCP, pd-standard by default)."""
    gb_month = 0.0
    for m in node_config.get("BlockDeviceMappings", []):
        ebs = m.get("Ebs", {})
        gb_month += ebs.get("VolumeSize", 8) * costs["disks"][ebs.get("VolumeType", "gp3")]
    for d in node_config.get("disks", []):
        p = d.get("initializeParams", {})
        kind = p.get("diskType", "pd-standard").rsplit("/", 1)[-1]
        gb_month += p.get("diskSizeGb", 10) * costs["disks"][kind]
    return gb_month / costs["hours_per_month"]


def node_price(node_type: dict, costs: dict) -> float:
    """$/h of one node of this type: instance (spot price for spot types) + boot disk."""
    nc = node_type["node_config"]
    prices = costs["instances"][instance_type(nc)]
    return (prices["spot"] if is_spot(nc) else prices["on_demand"]) + disk_per_hour(nc, costs)


def node_prices(config: dict, costs: dict) -> dict[str, float]:
    return {name: node_price(t, costs) for name, t in config["available_node_types"].items()}


def cost_per_hour(config: dict, costs: dict, launched: dict[str, int]) -> float:
    """The head plus the launched workers, $/h."""
    prices = node_prices(config, costs)
    return prices[config["head_node_type"]] + sum(prices[t] * n for t, n in launched.items())


def gpu_types(config: dict) -> tuple[str | None, str | None, list[str]]:
    """(single-GPU spot type, single-GPU on-demand type, multi-GPU types) of a launcher YAML."""
    spot = ondemand = None
    multi = []
    for name, t in config["available_node_types"].items():
        gpus = t.get("resources", {}).get("GPU", 0)
        if gpus > 1:
            multi.append(name)
        elif gpus == 1:
            if is_spot(t["node_config"]):
                spot = spot or name
            else:
                ondemand = ondemand or name
    return spot, ondemand, multi


def peaks(config: dict, costs: dict) -> dict[str, float]:
    """What the README states: the head plus as many single-GPU workers as the YAML allows
    (its global max_workers), spot, or on demand when spot launches fail."""
    prices = node_prices(config, costs)
    spot, ondemand, _ = gpu_types(config)
    n = config["max_workers"]
    head = prices[config["head_node_type"]]
    return {PEAK_SPOT: head + n * prices[spot or ondemand], PEAK_FALLBACK: head + n * prices[ondemand or spot]}


def _ceil_cents(x: float) -> float:
    """A stated ceiling is rounded up, so the README never states less than the prices add up to."""
    return math.ceil(round(x * 100, 6)) / 100


def _money(x: float) -> str:
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def render_table(costs: dict | None = None) -> str:
    costs = costs or load_costs()
    cols = {c: load_launcher(c) for c in CLOUDS}
    rows: list[tuple[str, dict[str, str]]] = []

    def row(label, fn):
        rows.append((label, {c: fn(c, cfg) for c, cfg in cols.items()}))

    def describe(cfg, name):
        t = cfg["available_node_types"][name]
        nc = t["node_config"]
        price = costs["instances"][instance_type(nc)]
        kind = "spot" if is_spot(nc) else "on demand"
        return (
            f"{instance_type(nc)}: {_money(price['spot' if is_spot(nc) else 'on_demand'])}/h {kind}"
            f" + boot disk {_money(disk_per_hour(nc, costs))}/h"
        )

    row("head (runs while the cluster is up)", lambda c, cfg: describe(cfg, cfg["head_node_type"]))
    row("GPU worker, preferred (1 GPU)", lambda c, cfg: describe(cfg, gpu_types(cfg)[0]))
    row("GPU worker, only while spot launches fail", lambda c, cfg: describe(cfg, gpu_types(cfg)[1]))
    row("GPU workers at most (`max_workers`)", lambda c, cfg: str(cfg["max_workers"]))
    row(
        f"**{PEAK_SPOT}** (head + all workers, spot)",
        lambda c, cfg: f"**{_money(_ceil_cents(peaks(cfg, costs)[PEAK_SPOT]))}**",
    )
    row(
        f"**{PEAK_FALLBACK}** (head + all workers, on demand)",
        lambda c, cfg: f"**{_money(_ceil_cents(peaks(cfg, costs)[PEAK_FALLBACK]))}**",
    )

    def multi(c, cfg):
        names = gpu_types(cfg)[2]
        return "; ".join(describe(cfg, n) + " each" for n in names) + " (off: `MULTI_GPU_NODES=1`)"

    row("8-GPU node for fine-tuning", multi)

    def boot(c, cfg):
        minutes = costs["boot_minutes"][c]
        p = node_prices(cfg, costs)[gpu_types(cfg)[0]]
        idle = cfg.get("idle_timeout_minutes", 5)
        return (
            f"~{minutes} min billed before the first trial (~{_money(minutes / 60 * p)}), "
            f"{idle} min idle before scale-down (~{_money(idle / 60 * p)})"
        )

    row("per GPU node started: boot + idle overhead", boot)

    def storage(c, cfg):
        s = costs["storage"][c]
        gb = max(s["example_gb"], s["min_gb"])
        month = gb * s["gb_month"]
        minimum = f"minimum {s['min_gb']} GB" if s["min_gb"] else "no minimum"
        billed = f", billed as {gb} GB" if gb > s["example_gb"] else ""
        return (
            f"{s['name']} {_money(s['gb_month'])}/GB-month, {minimum} ({s['note']}): "
            f"{s['example_gb']} GB of features{billed}: {_money(month)}/month = {_money(month / costs['hours_per_month'])}/h"
        )

    row("shared storage (while it exists, cluster up or not)", storage)

    for sweep, gpu_h in costs["sweeps"].items():

        def sweep_cost(c, cfg, gpu_h=gpu_h):
            p = node_prices(cfg, costs)
            worker = p[gpu_types(cfg)[0]]
            n = cfg["max_workers"]
            overhead_h = (costs["boot_minutes"][c] + cfg.get("idle_timeout_minutes", 5)) / 60
            wall_h = gpu_h / n + overhead_h
            total = gpu_h * worker + n * overhead_h * worker + wall_h * p[cfg["head_node_type"]]
            return f"~{_money(total)} (~{gpu_h} GPU-h on {n} spot workers, ~{wall_h:.1f} h wall)"

        row(f"one paper sweep `{sweep}`, compute only", sweep_cost)

    header = (
        "| | " + " | ".join(f"{CLOUDS[c]} (`launcher/{c}.yaml`, {cols[c]['provider']['region']})" for c in cols) + " |"
    )
    lines = [header, "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(v[c] for c in cols) + " |" for label, v in rows]
    return "\n".join(lines) + "\n"


def readme_block(text: str | None = None) -> str:
    text = README.read_text() if text is None else text
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n") + "\n"


def write_readme() -> None:
    text = README.read_text()
    new = text[: text.index(BEGIN) + len(BEGIN)] + "\n" + render_table() + text[text.index(END) :]
    README.write_text(new)


def stated_peaks(cloud: str, text: str | None = None) -> dict[str, float]:
    """The peak $/h the README states for a cloud (read back from its table)."""
    block = readme_block(text).splitlines()
    header = [c.strip() for c in block[0].strip("|").split("|")]
    col = next(i for i, h in enumerate(header) if h.startswith(CLOUDS[cloud]))
    out = {}
    for line in block[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for key in (PEAK_SPOT, PEAK_FALLBACK):
            if cells[0].startswith(f"**{key}**"):
                out[key] = float(cells[col].strip("*$").replace(",", ""))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true")
    p.add_argument("--ray", action="store_true")
    a = p.parse_args(argv)
    if a.write:
        write_readme()
        print(f"rewrote the cost table in {README}")
    elif a.ray:
        sys.path.insert(0, str(Path(__file__).parent))
        from node_selection import select_v2, sweep_demands

        costs = load_costs()
        for cloud in CLOUDS:
            cfg = load_launcher(cloud)
            spot = gpu_types(cfg)[0]
            for spec in sorted((ROOT / "sweeps").glob("*.yaml")):
                for what, demand in sweep_demands(spec).items():
                    for label, unavailable in (("", ()), (" (spot unavailable)", (spot,))):
                        launched, waiting = select_v2(cfg, demand, unavailable)
                        print(
                            f"{cloud} {spec.stem:6s} {what:10s}{label}: {launched} + {waiting} waiting, "
                            f"{_money(cost_per_hour(cfg, costs, launched))}/h"
                        )
    else:
        sys.stdout.write(render_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
