#!/bin/sh
# Start the dinoscale MLflow tracking server: PostgreSQL backend store, S3-compatible artifact
# store (proxied, so Ray workers need no bucket credentials), basic-auth on. Used by
# mlflow-server.yaml (Kubernetes) and usable as-is on a VM. Every secret comes from the environment:
#   PGPASSWORD                       database password (libpq), also used by the auth database
#   MLFLOW_AUTH_ADMIN_PASSWORD       first admin's password (created on first start)
#   MLFLOW_FLASK_SERVER_SECRET_KEY   session/CSRF key of the auth app
#   AWS_ACCESS_KEY_ID/_SECRET_ACCESS_KEY  (or an instance/workload identity) for the artifact bucket
# Non-secret settings (defaults in brackets):
#   DINOSCALE_TRACKING_URI   the URL the cluster uses (cluster/cluster.env): its host name is the
#                            Host header the server accepts (MLflow 3.x, 3.17 measured, answers 403 to any other
#                            name; /health is exempt, so a green health check proves nothing)
#   DINOSCALE_TRACKING_ALIASES  further names, comma-separated (e.g. the Kubernetes Service `mlflow`)
#   MLFLOW_SERVER_ALLOWED_HOSTS / MLFLOW_SERVER_CORS_ALLOWED_ORIGINS  set them to override what is
#                            derived from the two above
#   MLFLOW_DB_HOST [mlflow-postgres]  MLFLOW_DB_PORT [5432]  MLFLOW_DB_USER [mlflow]
#   MLFLOW_DB_NAME [mlflow]  MLFLOW_AUTH_DB_NAME [mlflow_auth]
#   MLFLOW_ARTIFACTS (s3://bucket/prefix)  MLFLOW_S3_ENDPOINT_URL (MinIO / GCS interop / R2; unset = AWS)
#   MLFLOW_HOST [0.0.0.0]  MLFLOW_PORT [5000]  MLFLOW_WORKERS [4]
set -eu
: "${PGPASSWORD:?set PGPASSWORD (database password) from your secret store}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD from your secret store}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY from your secret store}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS, e.g. s3://my-bucket/mlflow}"
here="$(cd "$(dirname "$0")" && pwd)"
db_host="${MLFLOW_DB_HOST:-mlflow-postgres}"
db_port="${MLFLOW_DB_PORT:-5432}"
db_user="${MLFLOW_DB_USER:-mlflow}"

# Host names the server answers to: the tracking URI's host (with any port: behind a load balancer
# or a port-forward the port differs), the aliases, and what MLflow allows by default (loopback
# for port-forwards and private addresses).
if [ -z "${MLFLOW_SERVER_ALLOWED_HOSTS:-}" ]; then
  if [ -z "${DINOSCALE_TRACKING_URI:-}" ]; then
    echo "run-server.sh: set DINOSCALE_TRACKING_URI (cluster/cluster.env) or MLFLOW_SERVER_ALLOWED_HOSTS:" \
         "without them MLflow answers 403 to every request that names the server by its host name" >&2
    exit 2
  fi
  hostport="$(echo "$DINOSCALE_TRACKING_URI" | sed -E 's#^[a-zA-Z][a-zA-Z0-9+.-]*://##; s#^[^@/]*@##; s#[/?#].*$##')"
  scheme="$(echo "$DINOSCALE_TRACKING_URI" | sed -E 's#://.*$##')"
  host="${hostport%%:*}"
  case "$hostport" in *:*) port=":${hostport#*:}" ;; *) port="" ;; esac
  names="$host$(echo ",${DINOSCALE_TRACKING_ALIASES:-}" | tr -d ' ' | sed 's/,,*/,/g; s/,$//')"
  hosts="" origins=""
  for n in $(echo "$names" | tr ',' ' '); do
    hosts="$hosts,$n,$n:*"
    origins="$origins,$scheme://$n$port,http://$n,https://$n"
  done
  private="10.*,192.168.*,172.16.*,172.17.*,172.18.*,172.19.*,172.20.*,172.21.*,172.22.*,172.23.*,172.24.*,172.25.*,172.26.*,172.27.*,172.28.*,172.29.*,172.30.*,172.31.*"
  MLFLOW_SERVER_ALLOWED_HOSTS="${hosts#,},localhost,localhost:*,127.0.0.1,127.0.0.1:*,[[]::1]:*,$private"
  if [ -z "${MLFLOW_SERVER_CORS_ALLOWED_ORIGINS:-}" ]; then
    MLFLOW_SERVER_CORS_ALLOWED_ORIGINS="$(echo "${origins#,}" | tr ',' '\n' | awk '!seen[$0]++' | paste -sd, -)"
  fi
fi
export MLFLOW_SERVER_ALLOWED_HOSTS
if [ -n "${MLFLOW_SERVER_CORS_ALLOWED_ORIGINS:-}" ]; then export MLFLOW_SERVER_CORS_ALLOWED_ORIGINS; fi

# An empty MLFLOW_S3_ENDPOINT_URL reaches boto3 as endpoint_url="" ("Invalid endpoint"): unset it.
if [ -z "${MLFLOW_S3_ENDPOINT_URL:-}" ]; then unset MLFLOW_S3_ENDPOINT_URL; fi

# The auth app's database: basic_auth.ini is a template; render it into a private temporary file.
if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
  auth_dir="$(mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")"
  sed -e "s|@MLFLOW_DB_USER@|$db_user|; s|@MLFLOW_DB_HOST@|$db_host|; s|@MLFLOW_DB_PORT@|$db_port|" \
      -e "s|@MLFLOW_AUTH_DB_NAME@|${MLFLOW_AUTH_DB_NAME:-mlflow_auth}|" "$here/basic_auth.ini" > "$auth_dir/basic_auth.ini"
  export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
fi
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
# Background job execution is not needed for tracking and costs ~2.5 GB (see shared/ENVIRONMENT.md).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "run-server.sh: answering to ${MLFLOW_SERVER_ALLOWED_HOSTS%%,localhost*} (+ loopback, private addresses)" >&2
exec mlflow server --app-name basic-auth \
  --backend-store-uri "postgresql://$db_user@$db_host:$db_port/${MLFLOW_DB_NAME:-mlflow}" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}"
