#!/usr/bin/env bash
# The one prepared GPU script (run on a lent H100/H200 through the device tool, .whl carried):
# installs the carried timm wheel, then runs the extraction and the training checks.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
timeout 330 python3 benchmarks/gpu_check.py 2>&1 | tee ${OUT:-/tmp}/gpu_check.log
timeout 300 python3 benchmarks/gpu_train_check.py 2>&1 | tee ${OUT:-/tmp}/gpu_train_check.log
# fused extraction (issue 31): each file decoded once for 3 encoders x 3 resolutions, against one read per set
timeout 240 python3 benchmarks/bench_fused.py --n 256 --reps 1 --backbones dinov3-vits16 dinov3-vitb16 dinov3-vitl16 --resolutions 224 384 512 2>&1 | tee ${OUT:-/tmp}/bench_fused.log
cp benchmarks/results/fused.json ${OUT:-/tmp}/ 2>/dev/null || true
