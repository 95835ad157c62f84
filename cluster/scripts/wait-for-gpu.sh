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
