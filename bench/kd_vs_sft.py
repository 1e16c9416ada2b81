"""Does token-level distillation beat plain fine-tuning on the teacher's text? Same data, steps, seed.

    .venv/bin/python bench/kd_vs_sft.py                       # both pairs, ~40 minutes on 2 cores
    .venv/bin/python bench/kd_vs_sft.py --pairs same --steps 24

Pairs (real offline models, scripts/fetch_models.py):
- same tokenizer: teacher Qwen2.5-Coder-1.5B-Instruct served by llama.cpp with top_logprobs 20,
  student Qwen2.5-Coder-0.5B-Instruct, on Chinese text (鲁迅, from ../shared/corpus);
- cross tokenizer: the same teacher, student SmolLM2-135M-Instruct, on English text (Alice).
For each pair shifu's own stages make the data (chunk, tasks, teach with logprobs, dataset with
held-out chunks); then two students train from the same seed for the same steps: fine-tuning alone
(kd_ratio 0) and fine-tuning plus forward-KL distillation (kd_ratio 0.5). On the held-out teacher
answers it reports, for the base student and both trained ones: (i) teacher-forced KL from teacher
to student over the teacher's top-20 (+ tail), (ii) the student's NLL of the teacher's answers,
(iii) top-1 agreement with the teacher; (i) and (iii) over the tokens that have a teacher
distribution (all but end-of-turn tokens for the same tokenizer; the aligned share otherwise).
Writes its section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from common import ROOT, machine, write_section

CACHE = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))
CORPUS = ROOT.parent / "shared" / "corpus"
RUNS = ROOT / "runs" / "bench-kd"

PAIRS = {
    "same": {"student": "qwen0.5b", "text": ("luxun_fiction.txt", 2600, 5400), "chunk_size": 300},
    "cross": {"student": "smollm2-135m", "text": ("english.txt", 1500, 6500), "chunk_size": 700},
}


def corpus_excerpt(name: str, start: int, end: int, dest: Path) -> Path:
    text = (CORPUS / name).read_text(encoding="utf-8")[start:end]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    return dest


def base_config(pair: str, base_url: str, steps: int) -> dict:
    spec = PAIRS[pair]
    folder = RUNS / pair
    raw = corpus_excerpt(*spec["text"], folder / "corpus.txt")
    return {
        "raw_data_path": str(raw), "model_name": str(CACHE / "hf" / spec["student"]),
        "work_dir": str(folder / "work"), "output_dir": str(folder / "adapter"),
        "jsonl_output_path": str(folder / "data" / "distill.jsonl"),
        "batch_size": 4, "learning_rate": 2e-4, "num_epochs": 100, "max_length": 384,
        "chunk_size": spec["chunk_size"], "gradient_checkpointing": False,
        "tasks": {"qa_per_chunk": 2, "qa_mode": "open", "seed": 1},
        "teacher": {"base_url": base_url, "model": "qwen2.5-coder-1.5b-instruct", "extra_body": {},
                    "max_concurrency": 2, "temperature": 0.3, "max_tokens": 160, "top_logprobs": 20,
                    "timeout_s": 600},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "distill": {"variant": "forward_kl", "temperature": 1.0},
        "train": {"max_steps": steps, "report_to": ["none"], "save_steps": 10_000, "logging_steps": 5, "seed": 7},
        "eval": {"eval_ratio": 0.2, "num_samples": 0, "max_examples": 64},
    }


def variant(tree: dict, name: str, kd_ratio: float):
    from shifu.config import config_from_dict

    work = Path(tree["work_dir"]).with_name(f"work-{name}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(tree["work_dir"], work, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    new = {**tree, "work_dir": str(work), "output_dir": str(Path(tree["output_dir"]).with_name(f"adapter-{name}"))}
    new["distill"] = {**tree["distill"], "kd_ratio": kd_ratio}
    return config_from_dict(new)


def run_pair(pair: str, base_url: str, steps: int) -> dict:
    from shifu.config import config_from_dict
    from shifu.evaluate import run_eval
    from shifu.pipeline import run_all
    from shifu.train import run_train

    tree = base_config(pair, base_url, steps)
    t0 = time.time()
    data = run_all(config_from_dict(tree), until="dataset")
    out = {"teacher_s": round(time.time() - t0), "train_examples": data["dataset"]["train_examples"],
           "eval_examples": data["dataset"]["eval_examples"], "requests": data["teach"].get("planned")}
    for name, ratio in (("sft", 0.0), ("kd", 0.5)):
        cfg = variant(tree, name, ratio)
        t1 = time.time()
        trained = run_train(cfg)
        out[f"{name}_train_s"] = round(time.time() - t1)
        out[f"{name}_coverage"] = trained.get("kd_coverage")
        report = run_eval(cfg)
        out["base"], out[name] = report["before"], report["after"]
        out["eval_coverage"] = report.get("kd_coverage")
    return out


def table(pair: str, r: dict) -> list[str]:
    spec = PAIRS[pair]
    when = f"{r['teacher_s']} s" if r["teacher_s"] else "answered by an earlier run, read from the store"
    lines = [f"### {pair} tokenizer: teacher Qwen2.5-Coder-1.5B (llama.cpp, top-20) -> student {spec['student']}", "",
             f"{r['train_examples']} training and {r['eval_examples']} held-out examples from {r['requests']} teacher "
             f"requests ({when}); {r['base']['tokens']} held-out answer tokens, "
             f"{r['base'].get('teacher_tokens', 0)} of them ({100 * (r.get('eval_coverage') or 0):.1f}%) with a "
             "teacher distribution (the tokens that (i) and (iii) count).", "",
             "| student | KL(teacher ‖ student), top-20 + tail | NLL of teacher answers | top-1 agreement | train time |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, label in (("base", "base (no training)"), ("sft", "fine-tuning only (kd_ratio 0)"),
                        ("kd", "fine-tuning + distillation (kd_ratio 0.5)")):
        m = r[name]
        t = f"{r[name + '_train_s']} s" if name != "base" else ""
        lines.append(f"| {label} | {m.get('kl_teacher_student', float('nan')):.4f} | {m['loss']:.4f} | "
                     f"{m.get('top1_agreement', float('nan')):.4f} | {t} |")
    return lines + [""]


def main() -> None:
    from shifu.progress import setup_logging
    from shifu.serve import llama_cpp_server

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="same,cross")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--render-only", action="store_true", help="rewrite the section from runs/bench-kd/results.json")
    a = p.parse_args()
    setup_logging()
    results = json.loads((RUNS / "results.json").read_text()) if a.render_only else {
        "machine": machine("torch", "transformers", "peft", "llama-cpp-python")}
    server = llama_cpp_server(CACHE / "gguf" / "qwen1.5b.gguf", "qwen2.5-coder-1.5b-instruct", RUNS / "server.log")
    with contextlib.nullcontext() if a.render_only else server as url:
        for pair in [] if a.render_only else a.pairs.split(","):
            results[pair] = run_pair(pair, url, a.steps)
            print(pair, results[pair], flush=True)
            (RUNS / "results.json").write_text(json.dumps(results, indent=1))
    args = [x for x in sys.argv[1:] if x != "--render-only"]
    lines = ["## Distillation vs fine-tuning alone (issue 5)", "",
             f"Command: `{' '.join(['.venv/bin/python bench/kd_vs_sft.py', *args])}`  ",
             f"Machine: {results.get('machine') or machine('torch', 'transformers', 'peft', 'llama-cpp-python')}  ",
             f"Same examples, {a.steps} optimizer steps, batch 4, lr 2e-4, LoRA r=8 all-linear, seed 7, for both "
             "students; metrics on held-out chunks' teacher answers, teacher-forced.", ""]
    for pair, r in results.items():
        if pair != "machine":
            lines += table(pair, r)
    write_section("kd_vs_sft", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
