#!/bin/sh
# On a node with an NVIDIA GPU, wait until its driver answers and docker has the NVIDIA runtime,
# before Ray's `docker run` (launcher initialization_commands, on the host). Ray decides at
# `docker run` time whether to add the NVIDIA runtime (it runs `nvidia-smi`); the GCP Deep Learning
# VM installs the driver in the background at first boot, so without this wait the container
# starts without GPUs. Nodes without an NVIDIA PCI device (the CPU head) return at once.
#   DINOSCALE_GPU_WAIT_S  how long to wait (default 900 s), DINOSCALE_GPU_POLL_S  poll interval (5 s),
#   DINOSCALE_SYSFS  sysfs root (tests)
set -eu
sysfs="${DINOSCALE_SYSFS:-/sys}"
limit="${DINOSCALE_GPU_WAIT_S:-900}"
poll="${DINOSCALE_GPU_POLL_S:-5}"
nvidia=0
for vendor in "$sysfs"/bus/pci/devices/*/vendor; do
  [ -r "$vendor" ] || continue
  if [ "$(cat "$vendor")" = 0x10de ]; then nvidia=1; break; fi
done
if [ "$nvidia" = 0 ]; then
  echo "wait-for-gpu: no NVIDIA device on this node, nothing to wait for"
  exit 0
fi
waited=0
until nvidia-smi -L >/dev/null 2>&1; do
  if [ "$waited" -ge "$limit" ]; then
    echo "wait-for-gpu: the NVIDIA driver did not answer within ${limit}s (nvidia-smi); see cluster/README.md" >&2
    exit 1
  fi
  echo "wait-for-gpu: waiting for the NVIDIA driver (${waited}s)"
  sleep "$poll"
  waited=$((waited + poll))
done
echo "wait-for-gpu: $(nvidia-smi -L | head -n 1) after ${waited}s"
# The image's CUDA build needs a driver at least this new (cluster.env, beside this script): below it
# torch sees no GPU and the autoscaler would replace the node again and again, billing each start.
if [ -z "${DINOSCALE_MIN_DRIVER:-}" ] && [ -r "$(dirname "$0")/../cluster.env" ]; then
  DINOSCALE_MIN_DRIVER=$(sed -n 's/^DINOSCALE_MIN_DRIVER=//p' "$(dirname "$0")/../cluster.env")
fi
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
major=${driver%%.*}
case "$major" in
  ''|*[!0-9]*) echo "wait-for-gpu: could not read the driver version ('$driver'); not checked" ;;
  *)
    if [ -n "${DINOSCALE_MIN_DRIVER:-}" ] && [ "$major" -lt "$DINOSCALE_MIN_DRIVER" ]; then
      echo "wait-for-gpu: NVIDIA driver $driver is older than $DINOSCALE_MIN_DRIVER, which the image's CUDA build needs:" \
        "boot a host image with driver >= $DINOSCALE_MIN_DRIVER (cluster/README.md section 4)" >&2
      exit 1
    fi
    echo "wait-for-gpu: driver $driver (>= ${DINOSCALE_MIN_DRIVER:-any})" ;;
esac
# `docker run --gpus all` needs the NVIDIA container toolkit registered with docker.
if ! docker info 2>/dev/null | grep -qi nvidia; then
  if command -v nvidia-ctk >/dev/null 2>&1; then
    echo "wait-for-gpu: registering the NVIDIA runtime with docker"
    sudo nvidia-ctk runtime configure --runtime=docker
    sudo systemctl restart docker
  else
    echo "wait-for-gpu: docker has no NVIDIA runtime and nvidia-ctk is missing (install nvidia-container-toolkit)" >&2
    exit 1
  fi
fi
