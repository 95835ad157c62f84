"""Render a launcher YAML (cluster/launcher/<cloud>.yaml) for `ray up`: the image, in both places
that name it (docker.image and the registry-login command), and the multi-GPU node types, which are
off (max_workers: 0) unless asked for. `make cluster-up` runs this and `ray up` on the output.

    python cluster/scripts/render_launcher.py cluster/launcher/aws.yaml [--image IMG] [--multi-gpu-nodes N]

Multi-GPU node types are the ones whose resources hold more than one GPU. With N > 0 Ray's node
selection sends probe trials there too (it prefers the node it fills best): for fine-tuning sweeps
only, see cluster/README.md 'Costs'.
"""

from __future__ import annotations

import argparse
import copy
import sys

import yaml

LOGIN = "scripts/registry-login.sh"


def render(config: dict, image: str | None = None, multi_gpu_nodes: int = 0) -> dict:
    config = copy.deepcopy(config)
    old = config["docker"]["image"]
    if image:
        config["docker"]["image"] = image
        config["initialization_commands"] = [
            c.replace(f" {old}", f" {image}") if LOGIN in c else c for c in config["initialization_commands"]
        ]
    for t in config["available_node_types"].values():
        if t.get("resources", {}).get("GPU", 0) > 1:
            t["max_workers"] = int(multi_gpu_nodes)
    if multi_gpu_nodes:
        # room for the multi-GPU nodes on top of the single-GPU ones
        config["max_workers"] = int(config["max_workers"]) + int(multi_gpu_nodes)
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("launcher")
    p.add_argument("--image", default="")
    p.add_argument("--multi-gpu-nodes", type=int, default=0)
    a = p.parse_args(argv)
    with open(a.launcher) as f:
        config = yaml.safe_load(f)
    out = render(config, a.image or None, a.multi_gpu_nodes)
    sys.stdout.write(
        f"# rendered from {a.launcher} by cluster/scripts/render_launcher.py: edit that file, not this one\n"
    )
    yaml.safe_dump(out, sys.stdout, sort_keys=False, width=200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
