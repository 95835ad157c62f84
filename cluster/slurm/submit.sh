#!/bin/bash
# Submit a dinoscale sweep to Slurm: the spec's resources become sbatch options, then
# cluster/slurm/dinoscale.sbatch runs the Ray cluster and the sweep. Run from the dinoscale checkout
# on the shared filesystem (the folder the job starts in; relative spec and storage paths resolve there).
#
#   cluster/slurm/submit.sh SPEC [extra sbatch options...]
# Settings (environment; `make slurm-submit` passes them): NODES (1), GPUS (per node; 0 for demo specs,
# else 1), CPUS, MEM_GB (per node; default from the spec), TIME (24:00:00), PARTITION, ACCOUNT,
# SIGNAL_LEAD (180 s), PYTHON (the python that has dinoscale; default: python on PATH), and those of
# dinoscale.sbatch (DINOSCALE_STORAGE, DINOSCALE_TRACKING_URI, DINOSCALE_CONTAINER, RESUME, ...).
set -euo pipefail
SPEC=${1:?usage: submit.sh SPEC [sbatch options...]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python}
[[ -f "$SPEC" ]] || { echo "error: $SPEC: no such spec file" >&2; exit 2; }
command -v sbatch > /dev/null || { echo "error: sbatch not found: run this on a Slurm login node" >&2; exit 2; }
mkdir -p "${SLURM_LOGS:-slurm-logs}"
OPTS=$("$PY" "$HERE/slurm_ray.py" options "$SPEC" --nodes "${NODES:-1}" ${GPUS:+--gpus "$GPUS"} \
    ${CPUS:+--cpus "$CPUS"} ${MEM_GB:+--mem-gb "$MEM_GB"} --time "${TIME:-24:00:00}" \
    --signal-lead "${SIGNAL_LEAD:-180}" --partition "${PARTITION:-}" --account "${ACCOUNT:-}" \
    --output "$(cd "${SLURM_LOGS:-slurm-logs}" && pwd)/%x-%j.out" | tr '\n' ' ')
OPTS="$OPTS $*"
export DINOSCALE_SPEC=$SPEC DINOSCALE_HOME=$ROOT DINOSCALE_SBATCH_OPTS=$OPTS
export DINOSCALE_SBATCH_SCRIPT=$HERE/dinoscale.sbatch
echo "sbatch $OPTS $DINOSCALE_SBATCH_SCRIPT" >&2
# shellcheck disable=SC2086  # OPTS is a list of options without spaces inside
sbatch --parsable $OPTS "$DINOSCALE_SBATCH_SCRIPT"
