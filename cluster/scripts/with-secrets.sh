#!/bin/sh
# Run a command with the cluster's secrets in its environment, fetched at start from the cloud's
# secret manager (never written to disk). Used by the launcher's start commands, so `ray start`
# and every Ray worker, trial and job driver below it inherit them.
#   DINOSCALE_SECRETS=aws|gcp|env   (env: expect them in the environment already, e.g. K8s Secrets)
#   secret names: dinoscale-mlflow-username, dinoscale-mlflow-password, dinoscale-ray-token
set -eu
mode="${DINOSCALE_SECRETS:-env}"
fetch() {
  case "$mode" in
    aws) python -c 'import sys, boto3; print(boto3.client("secretsmanager").get_secret_value(SecretId=sys.argv[1])["SecretString"], end="")' "$1" ;;
    gcp) python -c 'import sys, google.auth; from google.cloud import secretmanager as sm; _, p = google.auth.default(); print(sm.SecretManagerServiceClient().access_secret_version(name=f"projects/{p}/secrets/{sys.argv[1]}/versions/latest").payload.data.decode(), end="")' "$1" ;;
    *) return 1 ;;
  esac
}
if [ "$mode" != env ]; then
  MLFLOW_TRACKING_USERNAME="$(fetch dinoscale-mlflow-username)"
  MLFLOW_TRACKING_PASSWORD="$(fetch dinoscale-mlflow-password)"
  RAY_AUTH_TOKEN="$(fetch dinoscale-ray-token)"
  export MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD RAY_AUTH_TOKEN
fi
for v in MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD RAY_AUTH_TOKEN; do
  eval "val=\${$v:-}"
  if [ -z "$val" ]; then
    echo "with-secrets.sh: $v is not set (DINOSCALE_SECRETS=$mode); see cluster/README.md 'Secrets'" >&2
    exit 2
  fi
done
exec "$@"
