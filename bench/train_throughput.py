"""Training throughput and peak memory: shifu's training step against TRL's SFTTrainer, in one run.

    .venv/bin/pip install --no-deps trl==1.16.0 --target .bench-deps     # TRL for this benchmark only
    .venv/bin/python bench/train_throughput.py --models smollm2-135m,qwen0.5b --steps 10

Same model, same 64 examples (150 characters of 孔乙己 to continue, the next 150 as the answer,
with the model's chat template), batch 4, max_length 512, LoRA r=8 alpha=16 on all linear layers,
fp32, no gradient checkpointing, loss on the answer only, AdamW, lr 1e-4. Each configuration runs
in its own process; the figures are the median seconds per optimizer step after 2 warm-up steps,
real (unpadded) tokens per second, and the process's peak RSS. Also: shifu with distillation from
top-20 teacher logprobs (random but fixed targets; the cost does not depend on their values)
against shifu's plain fine-tuning step. Models come from $SHIFU_CACHE (scripts/fetch_models.py);
`tiny` is a random 4-layer Qwen2 with Qwen's 151,646-token vocabulary, built from a config.
Writes its section of docs/BENCHMARKS.md.

    .venv/bin/python bench/train_throughput.py --head-memory

Peak memory of the vocabulary head at max_length 2048: shifu's training step with the head run in
chunks of answer positions (shifu.losses.chunked_loss_sums) against the same step computing the
logits of every answer position at once (the path shifu keeps for FSDP), on a random 2-layer Qwen2
with Qwen's 151,936-token vocabulary, batch 2 of 2048 synthetic tokens (half answer), top-20
distillation, fp32 on CPU; peak RSS of each process. Writes its own section.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, write_section

CACHE = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))
BATCH, MAX_LEN, N_EXAMPLES, WARMUP = 4, 512, 64, 2


def examples() -> list[dict]:
    text = (ROOT / "data" / "sample_zh.txt").read_text(encoding="utf-8").replace("\n", "")
    out, step = [], (len(text) - 300) // N_EXAMPLES
    for i in range(N_EXAMPLES):
        a = i * step
        out.append({"instruction": "请用相同的文风续写下面这段文字。", "input": text[a:a + 150],
                    "output": text[a + 150:a + 300]})
    return out


def model_dir(name: str) -> str:
    if name != "tiny":
        return str(CACHE / "hf" / name)
    folder = Path(tempfile.gettempdir()) / "shifu-bench-tiny"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

        tok = AutoTokenizer.from_pretrained(CACHE / "hf" / "qwen0.5b")
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


class StepTimer:
    """A TrainerCallback (duck-typed) recording wall time per optimizer step."""

    def __init__(self):
        self.times, self.t = [], None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, *a, **k):
        self.t = time.perf_counter()

    def on_step_end(self, *a, **k):
        self.times.append(time.perf_counter() - self.t)


def child_shifu(model: str, steps: int, kd_k: int) -> dict:
    import numpy as np
    import torch

    from shifu.config import config_from_dict
    from shifu.encode import encode_examples
    from shifu.models import load_tokenizer
    from shifu.train import DistillationTrainer, SFTDataset, collate, load_student, training_args, use_packing

    tmp = tempfile.mkdtemp()
    cfg = config_from_dict({"model_name": model, "work_dir": tmp, "batch_size": BATCH, "learning_rate": 1e-4,
                            "max_length": MAX_LEN, "gradient_checkpointing": False,
                            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                            "distill": {"kd_ratio": 0.5 if kd_k else 0.0},
                            "train": {"max_steps": steps, "report_to": ["none"], "save_steps": 10_000,
                                      "warmup_ratio": 0.0, "lr_scheduler": "constant", "logging_steps": 1000}})
    tok = load_tokenizer(model)
    enc = encode_examples(tok, examples(), MAX_LEN)
    targets = None
    if kd_k:
        rng = np.random.default_rng(0)
        rows = {i: (rng.integers(0, len(tok), (len(x) - s, kd_k)).astype(np.int32),
                    np.sort(rng.uniform(-8, -0.1, (len(x) - s, kd_k)).astype(np.float32))[:, ::-1].copy())
                for i, (x, s) in enumerate(zip(enc.input_ids, enc.answer_start))}
        targets = type("T", (), {"width": kd_k, "get": lambda self, i: rows.get(i)})()
    torch.manual_seed(0)
    timer = StepTimer()
    model = load_student(cfg)
    packing = use_packing(cfg, model)  # sdpa on CPU: padded rows grouped by length
    trainer = DistillationTrainer(model=model, args=training_args(cfg, False, packing),
                                  train_dataset=SFTDataset(enc, targets), distill=cfg.distill,
                                  data_collator=lambda items: collate(items, packing, tok.pad_token_id),
                                  callbacks=[timer])
    trainer.train()
    tokens = float(np.mean([len(x) for x in enc.input_ids])) * BATCH
    return {"step_times": timer.times, "tokens_per_step": tokens}


def child_trl(model: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT / ".bench-deps"))
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from shifu.encode import encode_examples
    from shifu.models import load_tokenizer
    from shifu.tasks import format_prompt

    tok = load_tokenizer(model)
    rows = [{"prompt": [{"role": "user", "content": format_prompt(e["instruction"], e["input"])}],
             "completion": [{"role": "assistant", "content": e["output"]}]} for e in examples()]
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", bf16=False, fp16=False,
                     gradient_checkpointing=False, packing=False, padding_free=False, max_length=MAX_LEN,
                     completion_only_loss=True, report_to=[], save_strategy="no", logging_steps=1000,
                     use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=42)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = StepTimer()
    torch.manual_seed(0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[timer])
    trainer.train()
    enc = encode_examples(tok, examples(), MAX_LEN)  # the same chat-templated examples, for the token count
    return {"step_times": timer.times, "tokens_per_step": float(np.mean([len(x) for x in enc.input_ids])) * BATCH}


HEAD_BATCH, HEAD_LEN, HEAD_STEPS = 2, 2048, 3


def head_model_dir() -> str:
    folder = Path(tempfile.gettempdir()) / "shifu-bench-head"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return str(folder)


def child_head(chunked: bool) -> dict:
    import numpy as np
    import torch

    from shifu.config import config_from_dict
    from shifu.encode import Encoded
    from shifu.train import DistillationTrainer, SFTDataset, collate, load_student, training_args

    if not chunked:  # the logits of every answer position at once, as before
        DistillationTrainer._chunkable_head = lambda self, model: None
    n, vocab, k = HEAD_BATCH * (HEAD_STEPS + 1), 151936, 20
    rng = np.random.default_rng(0)
    enc = Encoded([rng.integers(10, vocab - 10, HEAD_LEN).astype(np.int32) for _ in range(n)],
                  np.full(n, HEAD_LEN // 2, np.int64))
    rows = {i: (rng.integers(0, vocab, (HEAD_LEN // 2, k)).astype(np.int32),
                np.sort(rng.uniform(-8, -0.1, (HEAD_LEN // 2, k)).astype(np.float32))[:, ::-1].copy())
            for i in range(n)}
    targets = type("T", (), {"width": k, "get": lambda self, i: rows.get(i)})()
    cfg = config_from_dict({"model_name": head_model_dir(), "work_dir": tempfile.mkdtemp(), "batch_size": HEAD_BATCH,
                            "max_length": HEAD_LEN, "gradient_checkpointing": False, "learning_rate": 1e-4,
                            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "distill": {"kd_ratio": 0.5},
                            "train": {"max_steps": HEAD_STEPS, "report_to": ["none"], "save_steps": 10_000,
                                      "logging_steps": 1000, "packing": False}})
    torch.manual_seed(0)
    timer = StepTimer()
    trainer = DistillationTrainer(model=load_student(cfg), args=training_args(cfg, False, False),
                                  train_dataset=SFTDataset(enc, targets), distill=cfg.distill,
                                  data_collator=lambda items: collate(items, False, 0), callbacks=[timer])
    trainer.train()
    return {"step_times": timer.times, "tokens_per_step": HEAD_BATCH * HEAD_LEN}


def head_memory() -> None:
    head_model_dir()
    out = {}
    for label, chunked in (("whole: logits of every answer position at once", False),
                           ("shifu: head in chunks of 512 answer positions", True)):
        cmd = [sys.executable, __file__, "--child", "head", "--kd-k", str(int(chunked))]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        out[label] = (res["peak_rss_gib"], statistics.median(res["step_times"][1:]))
        print(label, out[label], flush=True)
    (whole, t_whole), (chunk, t_chunk) = out.values()
    logits_gib = HEAD_BATCH * HEAD_LEN // 2 * 151936 * 4 / 2**30
    lines = ["## Vocabulary head memory at max_length 2048 (`bench/train_throughput.py --head-memory`)", "",
             "Command: `.venv/bin/python bench/train_throughput.py --head-memory`  ",
             f"Machine: {machine('torch', 'transformers', 'peft')}  ",
             f"Setup: random 2-layer Qwen2 (hidden 256) with Qwen's 151,936-token vocabulary, batch {HEAD_BATCH} x "
             f"{HEAD_LEN} tokens, half of them answer tokens ({HEAD_BATCH * HEAD_LEN // 2}), top-20 distillation "
             f"(kd_ratio 0.5), LoRA r=8, fp32 on CPU, {HEAD_STEPS} steps; one fp32 copy of the answer positions' "
             f"logits is {logits_gib:.2f} GiB. Peak RSS of each process; step time the median after the first.", "",
             "| head | peak RSS GiB | s/step |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {rss:.2f} | {t:.2f} |" for label, (rss, t) in out.items()]
    lines += ["", f"Chunking saves {whole - chunk:.2f} GiB here ({chunk / whole:.2f}x the peak), for "
              f"{t_chunk / t_whole:.2f}x the step time (each chunk's gradient is computed while its logits exist). "
              "On a GPU with a 7B student the same chunking keeps the head's share at one chunk: "
              "512 x 152,064 x 4 bytes = 0.29 GiB a copy, whatever batch_size x max_length."]
    write_section("head_memory", "\n".join(lines))
    print("\n".join(lines))


def run_child(kind: str, model: str, steps: int, kd_k: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", model, "--steps", str(steps), "--kd-k", str(kd_k)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} on {model} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    times = res["step_times"][WARMUP:]
    s = statistics.median(times)
    return {"s_per_step": s, "tokens_per_s": res["tokens_per_step"] / s, "peak_rss_gib": res["peak_rss_gib"],
            "wall_s": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2-135m,qwen0.5b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--child")
    p.add_argument("--model")
    p.add_argument("--kd-k", type=int, default=0)
    p.add_argument("--head-memory", action="store_true", help="peak memory of the vocabulary head, whole vs chunked")
    a = p.parse_args()
    if a.head_memory:
        head_memory()
        return
    if a.child:
        if a.child == "head":
            res = child_head(bool(a.kd_k))
        else:
            res = child_trl(a.model, a.steps) if a.child == "trl" else child_shifu(a.model, a.steps, a.kd_k)
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(res))
        return
    lines = ["## Training throughput: shifu vs TRL SFTTrainer", "",
             f"Command: `{' '.join(['.venv/bin/python', 'bench/train_throughput.py'] + sys.argv[1:])}`  ",
             f"Machine: {machine('torch', 'transformers', 'peft')}  ",
             f"Setup: batch {BATCH}, max_length {MAX_LEN}, {N_EXAMPLES} examples (150+150 characters of 孔乙己, chat template), "
             "LoRA r=8/alpha 16 all-linear, fp32, no gradient checkpointing, answer-only loss; median of "
             f"{a.steps - WARMUP} steps after {WARMUP} warm-up; peak RSS of the whole process; TRL 1.16.0 "
             "SFTTrainer (prompt-completion, completion_only_loss, no packing); shifu with `train.packing: auto`, "
             "which on CPU (sdpa attention) means padded rows grouped by length.", "",
             "| model | run | s/step | tokens/s | peak RSS GiB | vs TRL tokens/s | vs TRL memory |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in a.models.split(","):
        model = model_dir(name)
        trl = run_child("trl", model, a.steps)
        plain = run_child("shifu", model, a.steps)
        kd = run_child("shifu", model, a.steps, kd_k=20)
        for label, r in (("TRL SFTTrainer", trl), ("shifu, fine-tuning", plain), ("shifu, + top-20 distillation", kd)):
            lines.append(f"| {name} | {label} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                         f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x | {r['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x |")
        lines.append(f"| {name} | distillation step / plain step | {kd['s_per_step'] / plain['s_per_step']:.2f}x | | | | |")
        print("\n".join(lines[-4:]), flush=True)
    write_section("train_throughput", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
