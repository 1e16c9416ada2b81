#!/usr/bin/env bash
# GPU check for a lent GPU machine (device tool): shifu's LoRA training step on Qwen2.5-0.5B's and
# Qwen2.5-7B's architectures, printing tokens/s, peak GPU memory and MFU. Ends within 10 minutes.
#
# Here, once (the GPU machine cannot reach PyPI; its image lacks pydantic):
#   .venv/bin/pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu-wheels pydantic pyyaml charset-normalizer
# Then through the device tool, from the repository root, carrying .gpu-wheels:
#   bash bench/gpu_check.sh | tee $OUT/gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! $PY -c "import pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links .gpu-wheels pydantic pyyaml charset-normalizer
fi
export PYTHONPATH=src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 240 $PY bench/gpu_check.py --config bench/model_configs/qwen2.5-0.5b.json --steps 30 --batch 8 --seq 1024
timeout 300 $PY bench/gpu_check.py --config bench/model_configs/qwen2.5-7b.json --steps 15 --batch 4 --seq 1024
