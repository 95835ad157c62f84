"""The cost guard: Ray's own autoscaler node selection, run on both launcher YAMLs for the paper
profiles' extraction tasks and probe trials, may not pick a multi-GPU node type, nor nodes that cost
more per hour than cluster/README.md states. Prices come from cluster/costs.yaml, the one place the
README's cost table is rendered from (cluster/check/costs.py) and this test reads.

Both autoscalers are asked: v2 (`ray up`'s default since Ray 2.50) with the spot type available and
with its launches failing (a spot shortage: v2 then turns to another node type), and v1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
sys.path.insert(0, str(CLUSTER / "check"))

import costs  # noqa: E402 - from cluster/check, put on sys.path above
from node_selection import select_v1, select_v2, sweep_demands  # noqa: E402

CLOUDS = sorted(costs.CLOUDS)
PAPER_SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))


def _multi_gpu(config: dict, launched: dict[str, int]) -> list[str]:
    return [t for t in launched if config["available_node_types"][t]["resources"].get("GPU", 0) > 1]


def test_every_paper_profile_is_covered():
    assert {p.stem for p in PAPER_SPECS} >= {"xray", "ct", "mri", "wsi", "em", "petct"}
    for spec in PAPER_SPECS:
        assert yaml.safe_load(spec.read_text())["profile"] == "paper", spec


def test_the_xray_paper_sweep_asks_for_what_the_issue_measured():
    d = sweep_demands(ROOT / "sweeps" / "xray.yaml")
    assert d["extraction"] == [({"CPU": 8, "GPU": 1}, 12)]  # 3 backbones x 4 resolutions
    assert d["trials"] == [({"CPU": 4, "GPU": 0.25}, 72)]  # x 2 probes x 3 seeds, a quarter GPU each


@pytest.mark.parametrize("cloud", CLOUDS)
@pytest.mark.parametrize("spec", PAPER_SPECS, ids=lambda p: p.stem)
def test_ray_node_selection_stays_on_single_gpu_nodes_within_the_readme_cost(cloud, spec):
    config = costs.load_launcher(cloud)
    prices = costs.load_costs()
    stated = costs.stated_peaks(cloud)
    assert set(stated) == {costs.PEAK_SPOT, costs.PEAK_FALLBACK}, "cluster/README.md states both peak figures"
    spot, ondemand, _ = costs.gpu_types(config)
    demands = sweep_demands(spec)
    demands["both"] = demands["extraction"] + demands["trials"]
    for what, demand in demands.items():
        runs = {
            "v2": (select_v2(config, demand), costs.PEAK_SPOT),
            "v2, spot launches failing": (select_v2(config, demand, unavailable=(spot,)), costs.PEAK_FALLBACK),
            "v1": (select_v1(config, demand), costs.PEAK_FALLBACK),
        }
        for label, ((launched, _waiting), limit) in runs.items():
            where = f"{cloud} {spec.stem} {what} ({label}): Ray launches {launched}"
            assert launched, f"{where}: nothing can run these tasks"
            assert not _multi_gpu(config, launched), f"{where}: a multi-GPU node type for single-GPU work"
            per_hour = costs.cost_per_hour(config, prices, launched)
            assert per_hour <= stated[limit] + 1e-6, (
                f"{where}: ${per_hour:.2f}/h > README's {limit} ${stated[limit]:.2f}/h"
            )
        if spot:
            assert set(runs["v2"][0][0]) == {spot}, f"{cloud} {spec.stem} {what}: spot first, got {runs['v2'][0][0]}"
            assert set(runs["v2, spot launches failing"][0][0]) == {ondemand}, (
                f"{cloud} {spec.stem} {what}: when spot fails, the single-GPU on-demand type"
            )


@pytest.mark.parametrize("cloud", CLOUDS)
def test_the_guard_catches_the_multi_gpu_node_when_it_is_on(cloud):
    """With the 8xA100 type enabled (MULTI_GPU_NODES=1), Ray's selection puts probe trials there: the
    finding of issue 19 that this guard exists for (and why the type is off by default)."""
    sys.path.insert(0, str(CLUSTER / "scripts"))
    from render_launcher import render

    config = render(costs.load_launcher(cloud), multi_gpu_nodes=2)
    launched, _ = select_v2(config, sweep_demands(ROOT / "sweeps" / "xray.yaml")["trials"])
    assert _multi_gpu(config, launched), launched
    assert costs.cost_per_hour(config, costs.load_costs(), launched) > costs.stated_peaks(cloud)[costs.PEAK_FALLBACK]


def test_readme_cost_table_is_rendered_from_costs_yaml():
    assert costs.readme_block() == costs.render_table(), (
        "cluster/README.md's cost table is out of date: run `python cluster/check/costs.py --write`"
    )


def test_costs_yaml_prices_every_node_type_and_the_storage_minimum():
    prices = costs.load_costs()
    for cloud in CLOUDS:
        config = costs.load_launcher(cloud)
        for name, t in config["available_node_types"].items():
            it = costs.instance_type(t["node_config"])
            assert it in prices["instances"], f"{cloud}.{name}: no price for {it} in cluster/costs.yaml"
            if costs.is_spot(t["node_config"]):
                assert "spot" in prices["instances"][it], f"{it}: spot price missing"
    assert prices["storage"]["gcp"]["min_gb"] >= 1024, "Filestore Basic HDD shares are 1 TiB at least"
    assert "1024 GB" in costs.readme_block() and "Filestore" in costs.readme_block()
