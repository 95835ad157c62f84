#!/bin/sh
# Log the node's docker in to the registry of IMAGE, before Ray's `docker pull` (launcher
# initialization_commands, on the host). Credentials come from the node's cloud identity; nothing
# is written to this repository.
#   ECR  (<account>.dkr.ecr.<region>.amazonaws.com/...):  the instance profile (ecr:GetAuthorizationToken,
#        ecr:BatchGetImage, ecr:GetDownloadUrlForLayer), via `aws ecr get-login-password`
#   Artifact Registry (<region>-docker.pkg.dev/...) / gcr.io: the VM's service account
#        (roles/artifactregistry.reader), via `gcloud auth print-access-token`
#   any other registry: public images need nothing; for a private one set DINOSCALE_REGISTRY_USER
#        in cluster.env and store the password/token as the secret `dinoscale-registry-password`
#        (AWS Secrets Manager or GCP Secret Manager, read with the node's identity).
# Reads cluster.env beside this script's folder (the launcher's copy on the host) when present.
#   usage: registry-login.sh aws|gcp IMAGE
set -eu
cloud="${1:?usage: registry-login.sh aws|gcp IMAGE}"
image="${2:?usage: registry-login.sh aws|gcp IMAGE}"
env_file="$(dirname "$0")/../cluster.env"
if [ -f "$env_file" ]; then
  # shellcheck disable=SC1090
  . "$env_file"
fi

# The region of this EC2 instance: AWS_DEFAULT_REGION, else instance metadata (IMDSv2).
aws_region() {
  if [ -n "${AWS_DEFAULT_REGION:-}" ]; then echo "$AWS_DEFAULT_REGION"; return; fi
  imds="${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}"
  token="$(curl -fsS -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$imds/latest/api/token")"
  curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/placement/region"
}

first="${image%%/*}"
case "$first" in
  *.*|*:*|localhost) registry="$first" ;;
  *) registry=docker.io ;;   # Docker Hub: library/foo, user/foo
esac

# POSIX sh has no pipefail: every credential is read into a variable first, so a failed read
# stops here (set -e) instead of piping an empty password into `docker login`.
case "$registry" in
  *.dkr.ecr.*.amazonaws.com)
    region="$(echo "$registry" | sed -E 's/^[0-9]+[.]dkr[.]ecr[.]([a-z0-9-]+)[.]amazonaws[.]com$/\1/')"
    echo "registry-login: ECR $registry (region $region) with the instance profile"
    user=AWS
    password="$(aws ecr get-login-password --region "$region")"
    ;;
  *-docker.pkg.dev|gcr.io|*.gcr.io)
    echo "registry-login: $registry with the VM's service account"
    user=oauth2accesstoken
    password="$(gcloud auth print-access-token)"
    ;;
  *)
    if [ -z "${DINOSCALE_REGISTRY_USER:-}" ]; then
      echo "registry-login: $registry: no DINOSCALE_REGISTRY_USER in cluster.env, pulling anonymously (public image)"
      exit 0
    fi
    echo "registry-login: $registry as $DINOSCALE_REGISTRY_USER (secret dinoscale-registry-password)"
    user="$DINOSCALE_REGISTRY_USER"
    case "$cloud" in
      aws) region="$(aws_region)"
           password="$(aws secretsmanager get-secret-value --region "$region" --secret-id dinoscale-registry-password \
                       --query SecretString --output text)" ;;
      gcp) password="$(gcloud secrets versions access latest --secret=dinoscale-registry-password)" ;;
      *) echo "registry-login: unknown cloud '$cloud' (aws|gcp)" >&2; exit 2 ;;
    esac
    ;;
esac
if [ -z "$password" ]; then
  echo "registry-login: empty credential for $registry" >&2
  exit 2
fi
printf '%s' "$password" | docker login --username "$user" --password-stdin "$registry"
