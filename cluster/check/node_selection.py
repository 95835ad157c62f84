"""What Ray's own autoscaler would launch on a launcher YAML for a sweep's tasks.

Runs the node selection of the installed Ray on the YAML's node types, for the resource demands of
a paper profile (extraction tasks, probe trials): the scheduler of autoscaler v2 (what `ray up`
runs by default since Ray 2.50) and the bin-packing of v1 (RAY_UP_enable_autoscaler_v2=0).
Nothing is started. Used by cluster/check/costs.py and tests/test_cluster_costs.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import yaml

Demand = list[tuple[dict[str, float], int]]  # [(resource bundle, how many), ...]


def sweep_demands(spec_path: Path | str) -> dict[str, Demand]:
    """The Ray resource demands of a sweep spec, read from its YAML: one extraction task per
    backbone x resolution (feature set), one trial per cell (backbone x resolution x probe x
    strategy x seed). Frozen trials share a GPU (gpus_per_trial); lora/full ones train the encoder
    (gpus_per_training_trial)."""
    spec = yaml.safe_load(Path(spec_path).read_text())
    r = {
        "cpus_per_trial": 1,
        "gpus_per_trial": 0.25,
        "gpus_per_training_trial": 1,
        "cpus_per_extraction": 1,
        "gpus_per_extraction": 1,
        **(spec.get("resources") or {}),
    }
    n_sets = len(spec["backbones"]) * len(spec["resolutions"])
    per_strategy = n_sets * len(spec["probes"]) * len(spec.get("seeds") or [0])
    strategies = spec.get("strategies") or ["frozen"]
    frozen = sum(s == "frozen" for s in strategies)
    trials: Demand = []
    if frozen:
        trials.append(({"CPU": r["cpus_per_trial"], "GPU": r["gpus_per_trial"]}, per_strategy * frozen))
    if len(strategies) > frozen:
        trials.append(
            (
                {"CPU": r["cpus_per_trial"], "GPU": r["gpus_per_training_trial"]},
                per_strategy * (len(strategies) - frozen),
            )
        )
    return {
        "extraction": [({"CPU": r["cpus_per_extraction"], "GPU": r["gpus_per_extraction"]}, n_sets)],
        "trials": trials,
    }


def select_v2(config: dict, demand: Demand, unavailable: tuple[str, ...] = ()) -> tuple[dict[str, int], int]:
    """Node types (and counts) autoscaler v2's ResourceDemandScheduler launches for `demand` on an
    empty cluster, and how many bundles it leaves waiting. `unavailable`: node types whose launches
    have just failed (a spot shortage): their availability score is 0, as the v2 monitor sets it."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    ac = AutoscalingConfig(config, skip_content_hash=True)
    availability = {t: 0.0 for t in unavailable}
    request = SchedulingRequest(
        node_type_configs=ac.get_node_type_configs(),
        # the head is up already: the YAML's max_workers are the workers left to launch
        max_num_nodes=ac.get_max_num_worker_nodes(),
        resource_requests=[ResourceRequestByCount(request=ResourceRequestUtil.make(b), count=n) for b, n in demand],
        disable_launch_config_check=True,
        cloud_resource_availabilities=availability,
        recoverable_resource_availabilities=availability,
    )
    reply = ResourceDemandScheduler().schedule(request)
    launched = Counter()
    for launch in reply.to_launch:
        launched[launch.instance_type] += launch.count
    return dict(launched), len(reply.infeasible_resource_requests)


def select_v1(config: dict, demand: Demand) -> tuple[dict[str, int], int]:
    """The same with autoscaler v1's get_nodes_for (its default utilization scorer)."""
    from ray.autoscaler._private import resource_demand_scheduler as v1

    def scorer(node_resources, resources, node_type):
        return v1._default_utilization_scorer(node_resources, resources, node_type, node_availability_summary=None)

    bundles = [dict(b) for b, n in demand for _ in range(n)]
    head = config["head_node_type"]
    logger = logging.getLogger(v1.__name__)
    level, logger.level = logger.level, logging.ERROR  # "could not find a node type" for the waiting rest
    try:
        launched, rest = v1.get_nodes_for(
            config["available_node_types"], {head: 1}, head, config["max_workers"], bundles, utilization_scorer=scorer
        )
    finally:
        logger.setLevel(level)
    return dict(launched), len(rest)
