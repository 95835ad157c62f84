"""The plan as a budget: every paper spec plans real work from its dataset's published size, and the plan says
it in the units a lab signs off (wall-clock on a named cluster, GPU-hours, dollars, bytes)."""

from pathlib import Path

import pytest

from dinoscale.spec import load_spec
from dinoscale.sweep.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
PAPER_SPECS = sorted(p for p in (ROOT / "sweeps").glob("*.yaml") if load_spec(p).profile == "paper")


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSCALE_DATA", str(tmp_path / "no-data-here"))
    return tmp_path


@pytest.mark.parametrize("path", PAPER_SPECS, ids=lambda p: p.stem)
def test_no_paper_spec_plans_zero_work(path, no_data):
    plan = build_plan(load_spec(path), no_data)
    assert plan.dataset is None and plan.published is not None, "no published size: the plan would count nothing"
    assert plan.forward_passes() > 0 and plan.estimated_gflops() > 0
    assert sum(f.nbytes for f in plan.feature_sets if not f.online) > 0


def test_medmnist_sizes_are_the_published_counts_at_each_size(no_data):
    from dinoscale.data import published_size

    assert published_size("medmnist", "pneumoniamnist_224").units == 5_856
    assert published_size("medmnist", "chestmnist").pixels == (28, 28)
    vol = published_size("medmnist", "organmnist3d_64")
    assert (vol.units, vol.unit, vol.per_unit) == (1_742, "volume", 64)
    assert "MedMNIST" in vol.source
    plan = build_plan(load_spec(ROOT / "sweeps/medmnist-3d.yaml"), no_data)
    assert plan.forward_passes() == 1_742 * 64 * 3  # 3 backbones x 1 resolution, every slice of every volume


def _plan_output(plan, cluster, width=80) -> str:
    """print_plan into a console of ``width`` columns (the CLI's console is 140 wide off a terminal)."""
    import io

    from rich.console import Console

    from dinoscale.sweep import display
    from dinoscale.sweep.budget import plan_budget

    buf = io.StringIO()
    saved, display.console = display.console, Console(file=buf, width=width, highlight=False, color_system=None)
    try:
        display.print_plan(plan, plan_budget(plan, cluster))
    finally:
        display.console = saved
    return buf.getvalue()


def test_the_plan_prints_a_budget_on_a_named_cluster_in_80_columns(no_data):
    from dinoscale.sweep.budget import cluster_from_launcher

    plan = build_plan(load_spec(ROOT / "sweeps/ct.yaml"), no_data)
    out = _plan_output(plan, cluster_from_launcher(ROOT / "cluster/launcher/aws.yaml"))
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert "8 x (g5.2xlarge, 8 CPU, 1 x A10G" in out and "A10G: AWS g5 A10G: 70 TFLOP/s" in out
    assert "GPU-h" in out and "wall-clock" in out and "on demand" in out and " spot " in out
    assert "decode" in out and "bound" in out and "measured on" in out
    assert "GFLOP" not in out.replace("GFLOP/s", "")  # FLOPs in SI units, not 216,326,841 GFLOP
    for line in out.splitlines():  # money with two decimals
        for word in line.split():
            if word.startswith("$") and word[1:2].isdigit():
                assert word.rstrip(",;/h)").split(".")[-1][:2].isdigit(), line


def test_features_over_100_gib_point_to_online_features(no_data):
    from dinoscale.sweep.budget import cluster_from_launcher, plan_budget

    plan = build_plan(load_spec(ROOT / "sweeps/petct.yaml"), no_data)
    b = plan_budget(plan, cluster_from_launcher(ROOT / "cluster/launcher/aws.yaml"))
    assert b.disk_bytes > 2**40 and any("features.online" in w and "cache_budget_gb" in w for w in b.warnings)
    small = build_plan(load_spec(ROOT / "sweeps/xray.yaml"), no_data)
    assert not plan_budget(small, b.cluster).warnings


def test_memory_is_checked_against_the_target_nodes_listing_every_offending_task(no_data, tmp_path):
    import shutil

    import yaml

    from dinoscale.sweep.budget import cluster_from_launcher
    from dinoscale.sweep.plan import memory_problems

    launcher = tmp_path / "c" / "launcher" / "aws.yaml"
    launcher.parent.mkdir(parents=True)
    shutil.copy(ROOT / "cluster/launcher/aws.yaml", launcher)
    costs = yaml.safe_load((ROOT / "cluster/costs.yaml").read_text())
    costs["instances"]["g5.2xlarge"]["memory_gb"] = 3  # a node smaller than CT-RATE's tasks
    (tmp_path / "c" / "costs.yaml").write_text(yaml.safe_dump(costs))
    cluster = cluster_from_launcher(launcher)
    assert cluster.memory_bytes == 3 * 2**30
    plan = build_plan(load_spec(ROOT / "sweeps/ct.yaml"), no_data)
    problems = memory_problems(plan, cluster.memory_bytes)
    assert len(problems) > 8  # more than the old list showed
    out = _plan_output(plan, cluster, width=200)
    assert f"{len(problems)} task(s) would not fit" in out and "g5.2xlarge" in out
    assert all(p in out for p in problems)


def test_stage_bounds_follow_the_work(no_data):
    from dinoscale.sweep.budget import GPUS, Cluster, plan_budget

    plan = build_plan(load_spec(ROOT / "sweeps/xray.yaml"), no_data)
    one = Cluster("one A10G", 1, 8, 1, 32 * 2**30, GPUS["A10G"])
    big = plan_budget(plan, Cluster("one H100", 1, 8, 1, 32 * 2**30, GPUS["H100"]))
    slow = plan_budget(plan, one)
    # a faster GPU moves the small encoders onto the decode bound; the GPU stage never gets slower
    assert {s.bound for s in slow.extraction} >= {"GPU"}
    assert sum(s.bound == "decode" for s in big.extraction) > sum(s.bound == "decode" for s in slow.extraction)
    assert big.wall_s < slow.wall_s and big.gpu_hours < slow.gpu_hours
    eight = plan_budget(plan, Cluster("eight A10G", 8, 8, 1, 32 * 2**30, GPUS["A10G"]))
    assert eight.extraction_wall_s == pytest.approx(slow.extraction_wall_s / 8, rel=0.25)


@pytest.mark.slow
def test_readme_and_cluster_readme_quote_the_plan():
    from dinoscale.sweep.budget import BLOCK_BEGIN, BLOCK_END, README_LAUNCHERS, paper_budget_block

    for name, launchers in README_LAUNCHERS.items():
        text = (ROOT / name).read_text()
        quoted = text[text.index(BLOCK_BEGIN) : text.index(BLOCK_END) + len(BLOCK_END)]
        assert quoted == paper_budget_block(ROOT, launchers), (
            f"{name}: the budget figures differ from the plan's; run python -m dinoscale.sweep.budget --write"
        )


def test_calibrate_measures_every_input_kind_with_the_real_readers(tmp_path):
    import json

    from typer.testing import CliRunner

    from dinoscale.cli import app
    from dinoscale.sweep.budget import DECODE, load_calibration

    out = tmp_path / "cal.json"
    res = CliRunner().invoke(app, ["calibrate", "--seconds", "0.05", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cal = json.loads(out.read_text())
    assert set(cal["decode"]) == set(DECODE) and all(e["seconds"] > 0 for e in cal["decode"].values())
    assert cal["label"].startswith("measured on ") and cal["cpu_gflops"] > 0
    assert load_calibration(str(out))["decode"]["png"]["seconds"] == cal["decode"]["png"]["seconds"]


def test_a_cluster_file_that_is_not_a_launcher_is_one_message(tmp_path, no_data, monkeypatch):
    from typer.testing import CliRunner

    from dinoscale.cli import app

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "c.yaml"
    bad.write_text("available_node_types: {head: {resources: {CPU: 0}}}\n")
    for arg, says in ((str(tmp_path / "nope.yaml"), "no such file"), (str(bad), "no GPU worker type")):
        res = CliRunner().invoke(app, ["plan", str(ROOT / "sweeps/xray.yaml"), "--cluster", arg])
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, res.output
