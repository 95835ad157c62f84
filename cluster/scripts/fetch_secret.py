"""Read the cluster's secrets from the cloud's secret manager and print them as shell `export` lines
(values shell-quoted) for with-secrets.sh. Nothing is written to disk.

    python fetch_secret.py aws|gcp NAME=secret-id [NAME=secret-id ...]

AWS: boto3 needs a region and does not take it from the instance: AWS_REGION / AWS_DEFAULT_REGION
(the launcher sets it), else the profile's config, else the instance metadata service (IMDSv2, via
botocore's own fetcher; AWS_EC2_METADATA_SERVICE_ENDPOINT is honoured). GCP: the project of the
VM's default credentials (google.auth.default()).
"""

from __future__ import annotations

import os
import shlex
import sys


def aws_region() -> str:
    import boto3
    from botocore.utils import InstanceMetadataRegionFetcher

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or boto3.session.Session().region_name
    if region:
        return region
    endpoint = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    fetcher = InstanceMetadataRegionFetcher(
        timeout=2, num_attempts=2, config={"ec2_metadata_service_endpoint": endpoint} if endpoint else {}
    )
    region = fetcher.retrieve_region()
    if not region:
        raise SystemExit(
            "fetch_secret: no AWS region (set AWS_DEFAULT_REGION; the instance metadata service did not answer)"
        )
    return region


def fetch_aws(ids: list[str]) -> list[str]:
    import boto3

    client = boto3.client("secretsmanager", region_name=aws_region())
    return [client.get_secret_value(SecretId=i)["SecretString"] for i in ids]


def fetch_gcp(ids: list[str]) -> list[str]:
    import google.auth
    from google.cloud import secretmanager

    _, project = google.auth.default()
    client = secretmanager.SecretManagerServiceClient()
    return [
        client.access_secret_version(name=f"projects/{project}/secrets/{i}/versions/latest").payload.data.decode()
        for i in ids
    ]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in {"aws", "gcp"} or not all("=" in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    names, ids = zip(*(a.split("=", 1) for a in argv[1:]))
    values = (fetch_aws if argv[0] == "aws" else fetch_gcp)(list(ids))
    for name, value in zip(names, values):
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
