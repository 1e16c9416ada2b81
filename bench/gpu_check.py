"""GPU check: shifu's LoRA training step on a real architecture, timed on a lent GPU (run by gpu_check.sh).

    python bench/gpu_check.py --config bench/model_configs/qwen2.5-0.5b.json --steps 30
    python bench/gpu_check.py --config bench/model_configs/qwen2.5-7b.json --steps 20 --batch 4 --seq 1024

The model is built from its config with random weights (no hub on the GPU machine; step time and
memory do not depend on the weight values), in bf16, with LoRA r=16 on all linear layers, and
trained with shifu's DistillationTrainer on synthetic packed batches: half prompt, half answer.
Prints per variant (fine-tuning; + top-20 distillation; + gradient checkpointing): median seconds
per step, tokens per second, peak GPU memory, and model FLOPs utilisation, counting 4 x params
x tokens for a LoRA step (forward 2N, backward through frozen weights 2N; adapter FLOPs ignored)
plus attention, against 989 TFLOP/s dense bf16 (H100/H200 SXM datasheet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PEAK_TFLOPS = {"cuda": 989.0, "cpu": float("nan")}


class StepTimer:
    def __init__(self, device):
        self.device, self.times, self.t = device, [], None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, *a, **k):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def on_step_end(self, *a, **k):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t)


class RandomTargets:
    def __init__(self, lengths, starts, vocab, k):
        rng = np.random.default_rng(0)
        self.width = k
        self.rows = {i: (rng.integers(0, vocab, (n - s, k)).astype(np.int32),
                         np.sort(rng.uniform(-8, -0.1, (n - s, k)).astype(np.float32))[:, ::-1].copy())
                     for i, (n, s) in enumerate(zip(lengths, starts))}

    def get(self, i):
        return self.rows.get(i)


def run(config_path: str, steps: int, batch: int, seq: int, kd_k: int, checkpointing: bool, device: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from shifu.config import config_from_dict
    from shifu.encode import Encoded
    from shifu.train import DistillationTrainer, SFTDataset, collate, training_args, use_packing

    mcfg = AutoConfig.from_pretrained(config_path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    n = batch * (steps + 2)
    rng = np.random.default_rng(1)
    ids = [rng.integers(10, mcfg.vocab_size - 10, seq).astype(np.int32) for _ in range(n)]
    enc = Encoded(ids, np.full(n, seq // 2, np.int64))
    targets = RandomTargets([seq] * n, [seq // 2] * n, mcfg.vocab_size, kd_k) if kd_k else None
    cfg = config_from_dict({"model_name": config_path, "work_dir": "/tmp/shifu-gpu-check", "batch_size": batch,
                            "max_length": seq, "gradient_checkpointing": checkpointing, "learning_rate": 1e-4,
                            "distill": {"kd_ratio": 0.5 if kd_k else 0.0},
                            "train": {"max_steps": steps, "report_to": ["none"], "save_steps": 100000,
                                      "logging_steps": 100000, "precision": "bf16" if device == "cuda" else "fp32"}})
    timer = StepTimer(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    packing = use_packing(cfg, model)
    trainer = DistillationTrainer(model=model, args=training_args(cfg, False, packing),
                                  train_dataset=SFTDataset(enc, targets), distill=cfg.distill,
                                  data_collator=lambda items: collate(items, packing, 0), callbacks=[timer])
    trainer.train()
    s = statistics.median(timer.times[2:] or timer.times)
    tokens = batch * seq
    layers, hidden = mcfg.num_hidden_layers, mcfg.hidden_size
    attn = 4 * layers * hidden * seq * tokens / 2 * 2  # causal QK^T and AV, forward + backward input grads
    flops = 4 * n_params * tokens + attn
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"packing": packing, "s_per_step": round(s, 4), "tokens_per_s": round(tokens / s, 1), "peak_gib": round(peak, 2),
            "mfu": round(flops / s / 1e12 / PEAK_TFLOPS[device], 4), "params": n_params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="bench/model_configs/qwen2.5-0.5b.json")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    name = Path(a.config).stem
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    for label, kd_k, ckpt in (("fine-tuning", 0, False), ("+ top-20 distillation", 20, False),
                              ("+ gradient checkpointing", 0, True)):
        res = run(a.config, a.steps, a.batch, a.seq, kd_k, ckpt, a.device)
        print(json.dumps({"model": name, "device": gpu, "variant": label, "batch": a.batch, "seq": a.seq, **res}),
              flush=True)
        if a.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
