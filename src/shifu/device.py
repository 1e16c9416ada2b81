"""One rule for where a model runs and in what dtype, used by every stage that loads one.

    from shifu.device import placement
    where = placement(cfg.train.precision)      # Placement(device=cuda:0, dtype=torch.bfloat16)
    model = load_causal_lm(name, dtype=where.dtype).to(where.device)

On CUDA the base weights are bf16 where the GPU supports it, else fp16; on CPU fp32, unless the
config asks for bf16 (torch runs bf16 on CPU, which is how the half-precision path is tested here);
fp32 anywhere when `train.precision: fp32`. Under torchrun or accelerate each process takes the GPU
of its LOCAL_RANK. LoRA weights stay fp32: peft casts adapters up by default, which keeps their
small updates from vanishing in bf16.

Who calls it: training (`train.load_student`, and the Trainer's bf16/fp16 flags from
`Placement.trainer_flags`), merge, evaluation, the local teacher (`teacher.kind: local`) and local
teacher distributions (`distill.source: local`). `shifu estimate` calls `choose_dtype` with the GPU
it plans for, so its figures are for the dtype training will load.
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

    @property
    def device_map(self) -> dict:
        """from_pretrained's device_map that puts every weight on this device as it is read."""
        return {"": self.device}


def local_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def choose_dtype(precision: str, cuda: bool, bf16_ok: bool) -> torch.dtype:
    """The rule itself, free of the machine it runs on (the estimate plans for a GPU it may not see)."""
    if precision == "auto":
        return (torch.bfloat16 if bf16_ok else torch.float16) if cuda else torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if cuda and not bf16_ok:
            raise UserError("train.precision=bf16: this GPU has no bf16 support; use auto (fp16 there) or fp32")
        return torch.bfloat16
    if precision == "fp16":
        if not cuda:
            raise UserError("train.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
        return torch.float16
    raise UserError(f"train.precision={precision!r}: choose auto, fp32, bf16 or fp16")


def placement(precision: str = "auto") -> Placement:
    device = local_device()
    cuda = device.type == "cuda"
    return Placement(device, choose_dtype(precision, cuda, cuda and torch.cuda.is_bf16_supported()))


def merge_placement(precision: str, stored: torch.dtype) -> Placement:
    """Where a merge runs: the rule's device, and the dtype the weights are stored in when that is half
    precision, even on CPU, where the rule would say fp32: upcasting a 7B bf16 model for a merge
    takes 30 GB of RAM instead of 15, and the result is saved in the stored dtype anyway."""
    where = placement(precision)
    half = stored in (torch.bfloat16, torch.float16)
    if precision == "fp32" or not half or (stored == torch.float16 and where.device.type == "cpu"):
        return where  # fp16 matmuls on CPU are slow and lossy: merge those in the rule's dtype
    return Placement(where.device, stored)
