"""One rule for where a model runs and in what dtype, used by every stage that loads one.

    from shifu.device import placement
    where = placement(cfg.train.precision)      # Placement(device=cuda:0, dtype=torch.bfloat16)
    model = load_causal_lm(name, dtype=where.dtype).to(where.device)

On CUDA the base weights are bf16 where the GPU supports it, else fp16; on CPU fp32, unless the
config asks for bf16 (torch runs bf16 on CPU, which is how the half-precision path is tested here);
fp32 anywhere when `train.precision: fp32`. Under torchrun or accelerate each process takes the GPU
of its LOCAL_RANK. LoRA weights stay fp32: peft casts adapters up by default, which keeps their
small updates from vanishing in bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shifu.errors import UserError


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def trainer_flags(self) -> dict:
        """TrainingArguments' mixed-precision switches that match the weights' dtype."""
        return {"bf16": self.dtype == torch.bfloat16, "fp16": self.dtype == torch.float16}


def local_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def placement(precision: str = "auto") -> Placement:
    device = local_device()
    cuda = device.type == "cuda"
    if precision == "auto":
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    elif precision == "fp32":
        dtype = torch.float32
    elif precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise UserError("train.precision=bf16: this GPU has no bf16 support; use auto (fp16 there) or fp32")
        dtype = torch.bfloat16
    elif precision == "fp16":
        if not cuda:
            raise UserError("train.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
        dtype = torch.float16
    else:
        raise UserError(f"train.precision={precision!r}: choose auto, fp32, bf16 or fp16")
    return Placement(device, dtype)
