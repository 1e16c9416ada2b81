"""Does a multi-process launch shard, and does it give one process's adapter? `shifu train` on a small
Qwen2-shaped student built from a config (no hub), once in one process and once under
`accelerate launch --config_file CONFIG --num_processes N`; prints the parameter bytes each rank
holds (shifu logs them as training begins) and the largest relative adapter difference.

    python bench/fsdp_check.py --accelerate-config configs/accelerate/fsdp.yaml --procs 2 --expect-sharded
    python bench/fsdp_check.py --accelerate-config configs/accelerate/ddp.yaml --procs 2   # CPU dry run

FSDP needs 2 or more GPUs (accelerate runs CPU processes as DDP); bench/gpu_check.sh runs this with
SHIFU_GPU_CHECK_FSDP=1. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
try:  # tests/conftest.py builds the tiny tokenizer; a GPU image may lack pytest, whose decorators it only needs
    import pytest  # noqa: F401
except ImportError:
    import types

    sys.modules["pytest"] = types.SimpleNamespace(fixture=lambda *a, **k: (lambda f: f))


def prepare(folder: Path, hidden: int) -> Path:
    """Student, tokenizer and continuation examples from the bundled sample; no teacher (kd_ratio 0)."""
    import conftest
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = conftest.make_tokenizer(folder / "student", 800, conftest._texts())
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "student")
    text = conftest.SAMPLE_ZH.read_text(encoding="utf-8")
    rows = [{"instruction": "续写下面的文字。", "input": text[i:i + 120], "output": text[i + 120:i + 200]}
            for i in range(0, 64 * 100, 100)]
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (folder / "data" / "train.eval.jsonl").write_text("")
    return folder / "student"


def config(folder: Path, student: Path, name: str, batch_size: int) -> Path:
    import conftest

    from shifu.config import config_from_dict

    cfg = config_from_dict({
        "model_name": str(student), "work_dir": str(folder / f"work-{name}"), "output_dir": str(folder / f"adapter-{name}"),
        "jsonl_output_path": str(folder / "data" / "train.jsonl"), "batch_size": batch_size, "learning_rate": 1e-3,
        "max_length": 128, "gradient_checkpointing": False, "distill": {"kd_ratio": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "train": {"report_to": ["none"], "max_steps": 4, "save_steps": 1000}})
    return conftest.write_config(cfg, folder / f"{name}.yaml")


def held_bytes(stderr: str) -> dict[int, int]:
    return {int(r): int(b) for r, b in re.findall(r"rank (\d+) holds (\d+) parameter bytes", stderr)}


def worst_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return max(((x[k].float() - y[k].float()).abs().max() / (x[k].float().abs().max() + 1e-12)).item() for k in x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accelerate-config", default=str(ROOT / "configs" / "accelerate" / "fsdp.yaml"))
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expect-sharded", action="store_true", help="fail unless each rank holds at most 3/4")
    ap.add_argument("--tolerance", type=float, default=2e-2, help="largest relative adapter difference allowed")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        student = prepare(folder, args.hidden)
        one = subprocess.run([sys.executable, "-m", "shifu", "train", str(config(folder, student, "one", 4))],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config,
                  "--num_processes", str(args.procs), "--main_process_port", "29561", "-m", "shifu", "train",
                  str(config(folder, student, "many", 4 // args.procs))]
        many = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True)
        for name, run in (("1 process", one), (f"{args.procs} processes", many)):
            if run.returncode != 0:
                print(f"{name}: failed\n{run.stderr[-3000:]}")
                return 1
        whole, ranks = held_bytes(one.stderr).get(0), held_bytes(many.stderr)
        print(f"1 process holds {whole} parameter bytes; under {Path(args.accelerate_config).name}: "
              + ", ".join(f"rank {r} {b} ({b / whole:.2f})" for r, b in sorted(ranks.items())))
        diff = worst_difference(folder / "adapter-one", folder / "adapter-many")
        print(f"largest relative adapter difference vs 1 process: {diff:.3g} (tolerance {args.tolerance})")
        sharded = len(ranks) == args.procs and max(ranks.values()) <= 0.75 * whole
        print("sharded" if sharded else "not sharded: a rank holds more than 3/4 of the parameters")
        return 0 if diff <= args.tolerance and (sharded or not args.expect_sharded) else 1


if __name__ == "__main__":
    sys.exit(main())
