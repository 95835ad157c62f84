#!/bin/sh
# Start the dinoscale MLflow tracking server: PostgreSQL backend store, S3-compatible artifact
# store (proxied, so Ray workers need no bucket credentials), basic-auth on. Used by
# mlflow-server.yaml (Kubernetes) and usable as-is on a VM. Every secret comes from the environment:
#   PGPASSWORD                       database password (libpq), also used by the auth database
#   MLFLOW_AUTH_ADMIN_PASSWORD       first admin's password (created on first start)
#   MLFLOW_FLASK_SERVER_SECRET_KEY   session/CSRF key of the auth app
#   AWS_ACCESS_KEY_ID/_SECRET_ACCESS_KEY  (or an instance/workload identity) for the artifact bucket
# Non-secret settings: MLFLOW_DB_HOST, MLFLOW_DB_NAME, MLFLOW_ARTIFACTS (s3://bucket/prefix),
# MLFLOW_S3_ENDPOINT_URL (MinIO / GCS interop / R2), MLFLOW_WORKERS.
set -eu
: "${PGPASSWORD:?set PGPASSWORD (database password) from your secret store}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD from your secret store}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY from your secret store}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS, e.g. s3://my-bucket/mlflow}"
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$(dirname "$0")/basic_auth.ini}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
# Background job execution is not needed for tracking and costs ~2.5 GB (see shared/ENVIRONMENT.md).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server --app-name basic-auth \
  --backend-store-uri "postgresql://mlflow@${MLFLOW_DB_HOST:-mlflow-postgres}:5432/${MLFLOW_DB_NAME:-mlflow}" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" --serve-artifacts \
  --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-4}"
