#!/bin/sh
# Run a command with the cluster's secrets in its environment, fetched at start from the cloud's
# secret manager (never written to disk). Used by the launcher's start commands, so `ray start`
# and every Ray worker, trial and job driver below it inherit them.
#   DINOSCALE_SECRETS=aws|gcp|env   (env: expect them in the environment already, e.g. K8s Secrets)
#   secret names: dinoscale-mlflow-username, dinoscale-mlflow-password, dinoscale-ray-token
# AWS needs a region: AWS_DEFAULT_REGION (the launcher passes it) or the instance metadata
# (fetch_secret.py). RAY_AUTH_MODE=token comes from cluster.env; it is set here too, because a
# token without the mode is ignored by Ray.
set -eu
mode="${DINOSCALE_SECRETS:-env}"
here="$(cd "$(dirname "$0")" && pwd)"
case "$mode" in
  aws|gcp)
    exports="$(python "$here/fetch_secret.py" "$mode" MLFLOW_TRACKING_USERNAME=dinoscale-mlflow-username \
      MLFLOW_TRACKING_PASSWORD=dinoscale-mlflow-password RAY_AUTH_TOKEN=dinoscale-ray-token)" || {
      echo "with-secrets.sh: could not read the secrets from $mode (role/service account, region): see cluster/README.md 'Secrets'" >&2
      exit 2
    }
    eval "$exports"
    ;;
  env) ;;
  *) echo "with-secrets.sh: DINOSCALE_SECRETS=$mode: expected aws, gcp or env" >&2; exit 2 ;;
esac
for v in MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD RAY_AUTH_TOKEN; do
  eval "val=\${$v:-}"
  if [ -z "$val" ]; then
    echo "with-secrets.sh: $v is not set (DINOSCALE_SECRETS=$mode); see cluster/README.md 'Secrets'" >&2
    exit 2
  fi
done
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec "$@"
