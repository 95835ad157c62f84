"""Render a launcher YAML (cluster/launcher/<cloud>.yaml) for `ray up`: the image, in both places
that name it (docker.image and the registry-login command), the multi-GPU node types, which are
off (max_workers: 0) unless asked for, and on AWS the region (provider, the containers'
AWS_DEFAULT_REGION) and the AMI. `make cluster-up` runs this and `ray up` on the output.

    python cluster/scripts/render_launcher.py cluster/launcher/aws.yaml [--image IMG] [--multi-gpu-nodes N]
        [--region R] [--resolve-ami]

--resolve-ami: an `ImageId: resolve:ssm:<parameter>` (AWS's public parameter of the Deep Learning AMI)
is looked up once in the region with boto3 (`aws ssm get-parameter --name <parameter> --region R`
does the same by hand) and the AMI id written into every node type, so head and workers boot the
same image even if AWS publishes a new one meanwhile. A failed lookup: one line, exit 2.

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


SSM_PREFIX = "resolve:ssm:"
REGION_ENV = "--env AWS_DEFAULT_REGION="


class RenderError(Exception):
    """A lookup the user can fix (credentials, region, parameter): the message says which."""


def set_region(config: dict, region: str | None) -> None:
    """AWS: one region everywhere. The provider's (or the given one) goes into the containers'
    AWS_DEFAULT_REGION (secrets are read there); another region drops the provider's zones."""
    if config["provider"]["type"] != "aws":
        return
    if region and region != config["provider"]["region"]:
        config["provider"]["region"] = region
        config["provider"].pop("availability_zone", None)  # the zones were the old region's
    region = config["provider"]["region"]
    opts = config["docker"]["run_options"]
    config["docker"]["run_options"] = [REGION_ENV + region if o.startswith(REGION_ENV) else o for o in opts]


def resolve_amis(config: dict, get_parameter=None) -> dict[str, str]:
    """Replace every `resolve:ssm:<name>` ImageId by the parameter's value in the provider's region;
    returns {parameter: ami}. get_parameter(name, region) -> value (default: boto3's SSM client)."""
    region = config["provider"]["region"]
    if get_parameter is None:
        get_parameter = _ssm_get_parameter
    found: dict[str, str] = {}
    for t in config["available_node_types"].values():
        ami = t["node_config"].get("ImageId", "")
        if ami.startswith(SSM_PREFIX):
            name = ami[len(SSM_PREFIX) :]
            if name not in found:
                found[name] = get_parameter(name, region)
            t["node_config"]["ImageId"] = found[name]
    return found


def _ssm_get_parameter(name: str, region: str) -> str:
    import boto3  # the `cluster` extra; only this lookup needs it
    import botocore.exceptions

    try:
        return boto3.client("ssm", region_name=region).get_parameter(Name=name)["Parameter"]["Value"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise RenderError(
            f"could not look up the AMI parameter {name} in {region}: {e} "
            f"(check: aws ssm get-parameter --name {name} --region {region})"
        ) from None


def render(config: dict, image: str | None = None, multi_gpu_nodes: int = 0, region: str | None = None) -> dict:
    config = copy.deepcopy(config)
    set_region(config, region)
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
    p.add_argument("--region", default="", help="AWS: another region than the file's provider.region")
    p.add_argument("--resolve-ami", action="store_true", help="AWS: look up resolve:ssm: ImageIds now")
    a = p.parse_args(argv)
    with open(a.launcher) as f:
        config = yaml.safe_load(f)
    out = render(config, a.image or None, a.multi_gpu_nodes, a.region or None)
    if a.resolve_ami and out["provider"]["type"] == "aws":
        try:
            for name, ami in resolve_amis(out).items():
                print(f"AMI {ami} from {name} ({out['provider']['region']})", file=sys.stderr)
        except RenderError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    sys.stdout.write(
        f"# rendered from {a.launcher} by cluster/scripts/render_launcher.py: edit that file, not this one\n"
    )
    yaml.safe_dump(out, sys.stdout, sort_keys=False, width=200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
