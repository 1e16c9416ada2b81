#!/usr/bin/env bash
# GPU check for a lent GPU machine (device tool): shifu's real code paths on Qwen2.5-7B's shape with
# random weights (run_train in bf16 LoRA and, with bitsandbytes, QLoRA; peak GPU memory next to
# `shifu estimate`; tokens/s and MFU; run_merge's time and peak RAM). Ends within 10 minutes.
#
# Here, once (the GPU machine cannot reach PyPI; its image lacks pydantic):
#   .venv/bin/pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu-wheels pydantic pyyaml charset-normalizer
# Then through the device tool, from the repository root, carrying .gpu-wheels:
#   bash bench/gpu_check.sh | tee $OUT/gpu_check.log
# Dry run on CPU (seconds, tiny student in bf16): bash bench/gpu_check.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! $PY -c "import pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links .gpu-wheels pydantic pyyaml charset-normalizer
fi
export PYTHONPATH=src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--tiny" ]; then
  exec $PY bench/gpu_check.py --tiny --work "${TMPDIR:-/tmp}/shifu-gpu-check-tiny"
fi
# ---- FSDP and DeepSpeed (issue 18), instead of the checks below: SHIFU_GPU_CHECK_FSDP=1 bash bench/gpu_check.sh
# Needs 2 or more GPUs (NCCL takes one rank per GPU; accelerate runs CPU processes as DDP). Prints the
# parameter bytes each rank holds (about half with FSDP on 2) and the adapter's difference from 1 process.
if [ "${SHIFU_GPU_CHECK_FSDP:-0}" = "1" ]; then
  gpus=$(nvidia-smi -L | wc -l)
  if [ "$gpus" -lt 2 ]; then echo "FSDP check: $gpus GPU here, it needs 2 or more: FSDP stays unverified"; exit 0; fi
  timeout 280 $PY bench/fsdp_check.py --accelerate-config configs/accelerate/fsdp.yaml --procs 2 --expect-sharded
  if $PY -c "import deepspeed" 2>/dev/null; then
    for zero in 2 3; do
      timeout 140 $PY bench/fsdp_check.py --accelerate-config configs/accelerate/deepspeed-zero$zero.yaml --procs 2
    done
  else
    echo "DeepSpeed check: deepspeed is not installed here: ZeRO-2/3 stay unverified"
  fi
  exit 0
fi
# ---- end of the FSDP and DeepSpeed section
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 540 $PY bench/gpu_check.py --student Qwen/Qwen2.5-7B-Instruct --steps 12 --batch 4 --seq 1024
