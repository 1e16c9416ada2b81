"""GPU check: shifu's own code paths on a real-shaped student, on a lent GPU (run by gpu_check.sh).

    python bench/gpu_check.py --student Qwen/Qwen2.5-7B-Instruct --steps 12 --batch 4 --seq 1024
    python bench/gpu_check.py --tiny          # the same script on CPU in seconds (a dry run)

No hub on the GPU machine: the student is built with random weights from the config shipped with
shifu (src/shifu/model_configs/), saved in bf16 as safetensors with a small BPE tokenizer (timing and
memory do not depend on the weights or the vocabulary's text), and everything after that is
shifu's: `run_train` (load_student in the device rule's dtype, DistillationTrainer, the chunked
head) on synthetic examples of exactly --seq tokens, in bf16 LoRA and, where bitsandbytes is
installed, QLoRA; then `run_merge` in its own process. Prints one JSON line per run: peak GPU
memory (allocated and reserved) next to `shifu estimate`'s figure for the same config (its total
less the 0.75 GiB CUDA context, which the allocator does not count), tokens per second, model FLOPs
utilisation (4 x parameters x tokens for a LoRA step: forward 2N, backward through the frozen
weights 2N; the recomputation of gradient checkpointing and the adapters' FLOPs not counted; plus
causal attention) against 989 TFLOP/s dense bf16 (H100/H200 SXM datasheet), and the merge's time
and peak RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
PEAK_TFLOPS = 989.0
GiB = 2**30


def build_student(student: str, folder: Path, tiny: bool) -> int:
    """Random weights in bf16 from the shipped config (tiny: a 2-layer, 32-wide Qwen2), with a tokenizer."""
    import torch
    from conftest import SAMPLE_EN, SAMPLE_ZH, make_tokenizer
    from transformers import AutoModelForCausalLM, Qwen2Config

    from shifu.models import student_config

    tok = make_tokenizer(folder, 800, [SAMPLE_ZH.read_text(encoding="utf-8"), SAMPLE_EN.read_text(encoding="utf-8")])
    if tiny:
        config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    else:
        config = student_config(student)
    config.eos_token_id, config.pad_token_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def write_examples(path: Path, n: int) -> None:
    """Examples long enough to be cut at max_length: every micro-batch is batch x seq tokens."""
    from conftest import SAMPLE_ZH

    text = SAMPLE_ZH.read_text(encoding="utf-8").replace("\n", "")
    rows = [{"instruction": "请续写。", "input": text[i * 7 % 500:][:1500], "output": text[i * 11 % 700:][:3000],
             "chunk_id": i, "category": "文章生成"} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def train_once(work: Path, folder: Path, quantization: str, a, n_params: int, mcfg) -> dict:
    import torch

    from shifu.config import config_from_dict
    from shifu.estimate import memory_estimate
    from shifu.train import run_train

    cfg = config_from_dict({
        "model_name": str(folder), "work_dir": str(work / f"work-{quantization}"),
        "output_dir": str(work / f"adapter-{quantization}"), "jsonl_output_path": str(work / "data" / "train.jsonl"),
        "batch_size": a.batch, "max_length": a.seq, "gradient_checkpointing": True, "learning_rate": 1e-4,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "distill": {"kd_ratio": 0.0},
        "train": {"max_steps": a.steps, "report_to": ["none"], "save_steps": 100_000, "logging_steps": 100_000,
                  "quantization": quantization, "precision": "auto" if torch.cuda.is_available() else "bf16",
                  "warmup_ratio": 0.0}})
    est = memory_estimate(cfg)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    summary = run_train(cfg)
    wall = time.time() - t0
    tokens_s = summary.get("tokens_per_second") or 0.0
    attn = 4 * mcfg.num_hidden_layers * mcfg.hidden_size * a.seq / 2  # causal QK^T and AV, fwd + input grads, per token
    mfu = (4 * n_params + attn) * tokens_s / 1e12 / PEAK_TFLOPS if cuda else None
    return {"run": f"run_train, {'QLoRA' if quantization == '4bit' else 'LoRA bf16'}", "batch": a.batch, "seq": a.seq,
            "steps": summary["steps"], "train_loss": summary["train_loss"], "tokens_per_s": tokens_s,
            "mfu": round(mfu, 4) if mfu else None, "wall_s": round(wall, 1),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
            "estimate_gib_without_context": round(est["total"] - est["cuda_context_and_workspace"], 2),
            "estimate": {k: est[k] for k in ("weights", "lora_adapter_grads_optimizer", "activations",
                                              "output_head_and_loss", "total")},
            "_cfg": cfg}


def merge_child(cfg_json: str) -> None:
    from shifu.config import config_from_dict
    from shifu.merge import run_merge

    t0 = time.time()
    res = run_merge(config_from_dict(json.loads(cfg_json)))
    print(json.dumps({"run": "run_merge", "seconds": round(time.time() - t0, 1), "dtype": res["dtype"],
                      "merged_in": res["merged_in"], "device": res["device"], "max_logit_diff": res["max_logit_diff"],
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="Qwen/Qwen2.5-7B-Instruct", help="a student whose config ships with shifu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--work", default="/tmp/shifu-gpu-check")
    p.add_argument("--tiny", action="store_true", help="tiny student on CPU in bf16: a dry run of this script")
    p.add_argument("--merge-child")
    a = p.parse_args()
    if a.merge_child:
        merge_child(a.merge_child)
        return
    if a.tiny:
        a.steps, a.batch, a.seq = 2, 2, 128
    import torch

    work = Path(a.work)
    folder = work / "student"
    t0 = time.time()
    n_params = build_student(a.student, folder, a.tiny)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(folder)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"student": "tiny" if a.tiny else a.student, "params": n_params, "device": gpu,
                      "build_and_save_s": round(time.time() - t0, 1)}), flush=True)
    write_examples(work / "data" / "train.jsonl", a.batch * (a.steps + 1))
    runs = ["none"]
    try:
        import bitsandbytes  # noqa: F401

        runs.append("4bit") if torch.cuda.is_available() else None
    except ImportError:
        print(json.dumps({"run": "QLoRA", "skipped": "bitsandbytes is not installed"}), flush=True)
    last = None
    for quantization in runs:
        res = train_once(work, folder, quantization, a, n_params, mcfg)
        cfg = res.pop("_cfg")
        last = cfg if quantization == "none" else last
        print(json.dumps(res), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, __file__, "--merge-child", json.dumps(last.model_dump(mode="json"))],
                          capture_output=True, text=True, env=env)
    print(proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else json.dumps(
        {"run": "run_merge", "failed": proc.stderr[-2000:]}), flush=True)


if __name__ == "__main__":
    main()
