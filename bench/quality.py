"""Does distillation beat fine-tuning alone? Side by side, in one run, on a recorded real teacher.

    .venv/bin/python bench/quality.py                                   # the first run in docs/BENCHMARKS.md
    .venv/bin/python bench/quality.py --reuse --tag quality_sweep \
        --students smollm2-135m,qwen0.5b --variants sft,kd,kd-0.9,kd-t2,sft-lr5e-5,kd-lr5e-5,sft-48steps,kd-48steps \
        --variants-for qwen0.5b=sft,kd,kd-0.9,kd-t2,sft-lr5e-5,kd-lr5e-5   # the sweep
    .venv/bin/python bench/quality.py --students smollm2-135m --steps 4 # a quick look
    .venv/bin/python bench/quality.py --render-only                     # rewrite the section from runs/
With --reuse, adapters trained from the same settings and data are kept, and so are their scores.

Data: bench/data/teacher-{zh,en}.jsonl.gz, written once by scripts/record_teacher.py (Qwen2.5-Coder-
1.5B-Instruct through llama.cpp, top-20 logprobs on every answer token); no teacher runs here. shifu's
own dataset stage turns the recording into examples and holds out whole chunks (eval_ratio).
Students, each from the same examples, order, steps, learning rate and seed:
- Qwen2.5-Coder-0.5B-Instruct: the teacher's tokenizer (exact distillation), trained on Chinese and
  English together, figures per language;
- SmolLM2-135M-Instruct: another tokenizer (the teacher's top-k aligned to it), English only.
Variants: base (no training); fine-tuning alone (kd_ratio 0); fine-tuning + distillation (kd_ratio
0.5, forward KL); the same with reverse KL; more in VARIANTS (kd_ratio 0.9, T = 2, learning rate 5e-5,
48 steps), each compared with fine-tuning alone at its own learning rate and steps.
On 2 cores a Qwen 0.5B step (batch 4, about 350 tokens an example) takes about 36 s and scoring one
held-out example about 3 s, most of it the passage in the prompt, so each Qwen variant costs about
11 minutes trained and scored; SmolLM2-135M about a fifth of that. The first run: about 37 minutes from
nothing; the sweep: 72 minutes on top of it.
Metrics, on held-out chunks' teacher answers, teacher-forced: KL(teacher || student) over the
teacher's top-20 plus a tail bucket, the student's NLL of the teacher's answer, top-1 agreement with
the teacher; each a token average with a bootstrap 95% interval that resamples held-out examples, and
paired intervals for each variant against fine-tuning alone. ROUGE-L of greedy answers against the
teacher's, on --generate held-out prompts per language. The judge is left to `shifu eval`: it needs
a live judge model, which this rerun-without-the-teacher benchmark does not have.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, machine, write_section

CACHE = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))
DATA = ROOT / "bench" / "data"
RUNS = ROOT / "runs" / "bench-quality"
STUDENTS = {"qwen0.5b": ("zh", "en"), "smollm2-135m": ("en",)}
LABELS = {"qwen0.5b": "Qwen2.5-Coder-0.5B-Instruct (same tokenizer)",
          "smollm2-135m": "SmolLM2-135M-Instruct (other tokenizer)"}
# distill.* settings, plus learning_rate and train.max_steps; the first three are the default comparison, the rest a sweep
VARIANTS = {"sft": {"kd_ratio": 0.0}, "kd": {"kd_ratio": 0.5, "variant": "forward_kl"},
            "kd-reverse": {"kd_ratio": 0.5, "variant": "reverse_kl"},
            "kd-0.9": {"kd_ratio": 0.9}, "kd-t2": {"kd_ratio": 0.5, "temperature": 2.0},
            "sft-lr5e-5": {"kd_ratio": 0.0, "learning_rate": 5e-5}, "kd-lr5e-5": {"kd_ratio": 0.5, "learning_rate": 5e-5},
            "sft-24steps": {"kd_ratio": 0.0, "max_steps": 24}, "kd-24steps": {"kd_ratio": 0.5, "max_steps": 24},
            "sft-48steps": {"kd_ratio": 0.0, "max_steps": 48}, "kd-48steps": {"kd_ratio": 0.5, "max_steps": 48}}
LANG_OFFSET = {"zh": 0, "en": 100_000}  # chunk ids of the two recordings, kept apart when merged
# Held-out share of each recording's chunks, for at least 1,000 held-out answer tokens per language
# and at least 150 training examples: the teacher's Chinese answers are short (about 30 tokens).
EVAL_RATIO = {"zh": 0.2, "en": 0.25}
BOOT, SEED = 2000, 0


# ---- the recording ------------------------------------------------------------------------------

def load_recording(lang: str) -> dict:
    path = DATA / f"teacher-{lang}.jsonl.gz"
    if not path.exists():
        raise SystemExit(f"error: {path} not found; run `.venv/bin/python scripts/record_teacher.py --langs {lang}`")
    out: dict = {"chunks": [], "tasks": [], "answers": []}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            kind = obj.pop("type")
            if kind == "meta":
                out["meta"] = obj
            else:
                out[kind + "s"].append(obj)
    return out


def _shift(record: dict, offset: int) -> dict:
    """A record with its chunk id moved by offset, so that two languages' chunks stay apart."""
    return {**record, "chunk_id": record["chunk_id"] + offset}


def rebuild(lang: str, work: Path) -> dict:
    """A work_dir as shifu's teach stage would have left it (chunks, tasks, store); -> recorded settings."""
    from shifu.files import write_jsonl
    from shifu.store import _SCHEMA

    rec = load_recording(lang)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_jsonl(work / "chunks.jsonl", rec["chunks"])
    write_jsonl(work / "tasks.jsonl", rec["tasks"])
    with contextlib.closing(sqlite3.connect(work / "teacher.sqlite")) as db:
        db.execute(_SCHEMA)
        db.executemany("INSERT OR REPLACE INTO answers (key, status, content, finish_reason, flags, usage, logprobs, "
                       "attempts, updated_at, reasoning) VALUES (?, 'ok', ?, ?, ?, ?, ?, 1, 0, ?)",
                       [(a["key"], a["content"], a["finish_reason"], json.dumps(a["flags"]), json.dumps(a["usage"]),
                         base64.b64decode(a["logprobs"]) if a["logprobs"] else None, a["reasoning"] or None)
                        for a in rec["answers"]])
        db.commit()
    return {**rec["meta"]["config"], "meta": rec["meta"]}


def language_data(lang: str, a) -> tuple[dict, dict]:
    """shifu's dataset stage on one language's recording, so each language holds out its own chunks."""
    from shifu.config import config_from_dict
    from shifu.dataset import run_dataset

    folder = RUNS / f"data-{lang}"
    recorded = rebuild(lang, folder / "work")
    tree = tree_for("qwen0.5b", folder, recorded, a)
    tree["eval"] = {"eval_ratio": EVAL_RATIO[lang]}
    return tree, {**run_dataset(config_from_dict(tree)), "recording": recorded["meta"]}


def assemble(student: str, langs: tuple[str, ...], a) -> tuple[dict, dict]:
    """The student's folder: every language's split examples, chunks and stored answers in one."""
    from shifu.config import config_from_dict
    from shifu.files import read_jsonl, write_jsonl

    folder = RUNS / student
    parts = {g: language_data(g, a) for g in langs}
    tree = tree_for(student, folder, parts[langs[0]][0], a)
    cfg = config_from_dict(tree)
    shutil.rmtree(cfg.work, ignore_errors=True)
    cfg.work.mkdir(parents=True)
    files = [("chunks_path", "chunks_path"), ("examples_path", "examples_path"),
             ("jsonl_output_path", "jsonl_output_path"), ("eval_jsonl_path", "eval_jsonl_path")]
    for mine, theirs in files:
        rows = [_shift(r, LANG_OFFSET[g]) for g in langs
                for r in read_jsonl(getattr(config_from_dict(parts[g][0]), theirs))]
        write_jsonl(Path(getattr(cfg, mine)), rows)
    with contextlib.closing(sqlite3.connect(cfg.store_path)) as db:
        from shifu.store import _SCHEMA

        db.execute(_SCHEMA)
        for g in langs:
            db.execute("ATTACH DATABASE ? AS src", (str(config_from_dict(parts[g][0]).store_path),))
            db.execute("INSERT OR REPLACE INTO answers SELECT * FROM src.answers")
            db.commit()
            db.execute("DETACH DATABASE src")
    return tree, {g: d for g, (_, d) in parts.items()}


# ---- configs ------------------------------------------------------------------------------------

def tree_for(student: str, folder: Path, recorded: dict, a) -> dict:
    """Settings of the recording (so request keys match), the student, and the benchmark's training."""
    return {
        "raw_data_path": str(folder / "unused.txt"), "model_name": str(CACHE / "hf" / student),
        "work_dir": str(folder / "work"), "output_dir": str(folder / "adapter"),
        "jsonl_output_path": str(folder / "data" / "distill.jsonl"),
        **{k: recorded[k] for k in ("chunk_size", "teacher_data_ratio", "tasks", "teacher")},
        "batch_size": a.batch_size, "learning_rate": a.lr, "num_epochs": 100, "max_length": 512,
        "gradient_checkpointing": False,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "distill": {"kd_ratio": 0.5, "variant": "forward_kl", "temperature": 1.0},
        "train": {"max_steps": a.steps, "report_to": ["none"], "save_steps": 10_000, "logging_steps": 4,
                  "seed": 7, "warmup_steps": 0, "eval_steps": 10_000},
    }


def variant_config(tree: dict, name: str, settings: dict, copy: bool = True):
    from shifu.config import config_from_dict

    work = Path(tree["work_dir"]).with_name(f"work-{name}")
    if copy:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tree["work_dir"], work, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    # Training data alone, no held-out file beside it: the figures come from measure(), and the
    # trainer's own evaluation of every variant would cost minutes each on 2 cores.
    data = work / "train-only" / "distill.jsonl"
    if copy:
        data.parent.mkdir(parents=True)
        shutil.copy(tree["jsonl_output_path"], data)
    new = {**tree, "work_dir": str(work), "output_dir": str(Path(tree["output_dir"]).with_name(f"adapter-{name}")),
           "jsonl_output_path": str(data)}
    settings = dict(settings)
    new["learning_rate"] = settings.pop("learning_rate", tree["learning_rate"])
    new["train"] = {**tree["train"], "max_steps": settings.pop("max_steps", tree["train"]["max_steps"])}
    new["distill"] = {**tree["distill"], **settings}
    return config_from_dict(new)


def train_variant(tree: dict, name: str, reuse: bool) -> tuple[int, float | None]:
    """Train one variant -> (seconds, teacher coverage); with reuse, an adapter trained earlier from
    the same settings and data is kept (training is deterministic under the seed)."""
    from shifu.files import read_jsonl
    from shifu.train import run_train

    cfg = variant_config(tree, name, VARIANTS[name], copy=False)
    stamp = Path(cfg.output_dir) / "bench-settings.json"
    key = json.dumps([tree["learning_rate"], tree["batch_size"], tree["train"], VARIANTS[name],
                      list(read_jsonl(tree["jsonl_output_path"]))], sort_keys=True, ensure_ascii=False)
    if reuse and stamp.exists() and json.loads(stamp.read_text())["key"] == key:
        old = json.loads(stamp.read_text())
        return old["seconds"], old["coverage"]
    cfg = variant_config(tree, name, VARIANTS[name])
    t0 = time.time()
    trained = run_train(cfg)
    out = round(time.time() - t0), trained.get("kd_coverage")
    stamp.write_text(json.dumps({"key": key, "seconds": out[0], "coverage": out[1]}))
    return out


# ---- measuring ----------------------------------------------------------------------------------

def ratio_ci(values: np.ndarray, weights: np.ndarray) -> tuple[float, list[float]]:
    """Token average (ratio of per-example sums) and its bootstrap 95% interval over examples."""
    idx = np.random.default_rng(SEED).integers(0, len(values), size=(BOOT, len(values)))
    w = weights[idx].sum(1)
    draws = values[idx].sum(1)[w > 0] / w[w > 0]
    return float(values.sum() / weights.sum()), [float(x) for x in np.quantile(draws, [0.025, 0.975])]


def figures(rows: np.ndarray, rouge: list[float] | None) -> dict:
    """rows: shifu.evaluate.COLUMNS per example (ce, tokens, agree, kl, kd_tokens)."""
    out = {"tokens": int(rows[:, 1].sum()), "teacher_tokens": int(rows[:, 4].sum())}
    out["nll"], out["nll_ci"] = ratio_ci(rows[:, 0], rows[:, 1])
    if out["teacher_tokens"]:
        out["kl"], out["kl_ci"] = ratio_ci(rows[:, 3], rows[:, 4])
        out["top1"], out["top1_ci"] = ratio_ci(rows[:, 2], rows[:, 4])
    if rouge:
        out["rouge_l"], out["rouge_l_ci"] = ratio_ci(np.array(rouge), np.ones(len(rouge)))
    return out


def against(before: np.ndarray, after: np.ndarray, rouge_b: list[float] | None, rouge_a: list[float] | None) -> dict:
    """after - before on the same held-out examples, with paired bootstrap intervals."""
    from shifu.stats import paired_change

    kw = {"samples": BOOT, "seed": SEED}
    out = {"nll": paired_change(before[:, 0], after[:, 0], before[:, 1], higher_is_better=False, **kw)}
    if before[:, 4].sum():
        out["kl"] = paired_change(before[:, 3], after[:, 3], before[:, 4], higher_is_better=False, **kw)
        out["top1"] = paired_change(before[:, 2], after[:, 2], before[:, 4], **kw)
    if rouge_b and rouge_a:
        out["rouge_l"] = paired_change(rouge_b, rouge_a, **kw)
    return out


def spread(held: list[dict], n: int) -> list[int]:
    """Indices of n held-out prompts, one per chunk and category in turn."""
    from shifu.evaluate import spread as pick

    chosen = pick([{**e, "_i": i} for i, e in enumerate(held)], n)
    return [e["_i"] for e in chosen]


def measure(cfg, held_path: Path, names: list[str], langs: tuple[str, ...], n_generate: int, new_tokens: int,
            max_held: int) -> dict:
    """Base and every trained adapter scored on the same held-out examples, per language."""
    import torch
    from peft import PeftModel

    from shifu.encode import encode_examples
    from shifu.evaluate import generate, score
    from shifu.files import read_jsonl
    from shifu.models import load_causal_lm, load_tokenizer
    from shifu.overlap import rouge_l
    from shifu.targets import build_targets
    from shifu.tasks import format_prompt

    lang_of = {c["chunk_id"]: c["lang"] for c in read_jsonl(cfg.chunks_path)}
    held_all = list(read_jsonl(held_path))
    tok = load_tokenizer(cfg.model_name)
    base = load_causal_lm(cfg.model_name, dtype=torch.float32).eval()
    out: dict = {}
    for lang in langs:
        held = [e for e in held_all if lang_of[e["chunk_id"]] == lang][:max_held]
        enc = encode_examples(tok, held, cfg.max_length, None, cfg.work / "cache")
        targets, info = build_targets(cfg, tok, held, enc, scoring=True)
        gen_idx = spread(held, n_generate)
        prompts = [format_prompt(held[i]["instruction"], held[i]["input"]) for i in gen_idx]
        refs = [held[i]["output"] for i in gen_idx]
        out[lang] = {"examples": len(held), "chunks": len({e["chunk_id"] for e in held}), "generated": len(prompts),
                     "kd_coverage": info.get("kd_coverage"), "rows": {}, "rouge": {}}
        for name in ["base", *names]:
            folder = Path(cfg.output_dir).with_name(f"adapter-{name}")
            saved = folder.parent / f"scores-{name}-{lang}.json"
            key = _digest([cfg.model_name, (folder / "bench-settings.json").read_text() if name != "base" else "",
                           held, prompts, new_tokens])
            old = json.loads(saved.read_text()) if saved.exists() else {}
            if old.get("key") == key:
                out[lang]["rows"][name], out[lang]["rouge"][name] = np.array(old["rows"]), old["rouge"]
                continue
            model = base if name == "base" else PeftModel.from_pretrained(base, str(folder)).eval()
            out[lang]["rows"][name] = score(model, enc, targets, tok.pad_token_id, 4, base.device)
            answers = generate(model, tok, prompts, new_tokens, None, 4, base.device) if prompts else []
            out[lang]["rouge"][name] = [rouge_l(h, r, lang) for h, r in zip(answers, refs)]
            saved.write_text(json.dumps({"key": key, "rows": out[lang]["rows"][name].tolist(),
                                         "rouge": out[lang]["rouge"][name]}))
            if name != "base":
                base = model.unload()
    return out


def _digest(parts: list) -> str:
    """Scores are kept beside the adapters, keyed by everything they depend on, so a sweep that adds
    one variant scores only that one (about 2.5 minutes per language for the Qwen student)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def baseline(name: str, names: list[str]) -> str:
    """Fine-tuning alone with the same learning rate and steps: kd-lr5e-5 against sft-lr5e-5."""
    twin = "sft" + name[name.find("-"):] if "-" in name else "sft"
    return twin if twin in names and twin != name else "sft"


def run_student(student: str, a) -> dict:
    langs = tuple(g for g in STUDENTS[student] if g in a.langs)
    tree, data = assemble(student, langs, a)
    result = {"dataset": {g: {k: d[k] for k in ("train_examples", "eval_examples", "eval_chunks", "rejected")}
                          for g, d in data.items()},
              "recording": {g: {k: d["recording"][k] for k in ("teacher_sha256", "answers", "command", "recorded_at")}
                            for g, d in data.items()}, "train_s": {}, "kd_coverage": {}}
    names = a.variants_for.get(student, a.variants)
    for name in names:
        result["train_s"][name], result["kd_coverage"][name] = train_variant(tree, name, a.reuse)
        print(f"{student} {name}: trained in {result['train_s'][name]} s", flush=True)
    cfg = variant_config(tree, names[-1], VARIANTS[names[-1]], copy=False)
    t0 = time.time()
    held_path = Path(tree["jsonl_output_path"]).with_name("distill.eval.jsonl")
    measured = measure(cfg, held_path, names, langs, a.generate, a.new_tokens, a.max_held)
    result["measure_s"], result["new_tokens"] = round(time.time() - t0), a.new_tokens
    for m in measured.values():
        rows, rouge = m.pop("rows"), m.pop("rouge")
        m["models"] = {n: figures(rows[n], rouge[n]) for n in rows}
        m["vs_base"] = {n: against(rows["base"], rows[n], rouge["base"], rouge[n]) for n in names}
        if "sft" in rows:
            m["vs_sft"] = {n: {"against": b, **against(rows[b], rows[n], rouge[b], rouge[n])}
                           for n in names if n != "sft" for b in [baseline(n, names)]}
    result["langs"] = measured
    return result


def teacher_shape(lang: str) -> dict:
    """How much a top-20 distribution says beyond the sampled answer token: when the teacher's top-1
    holds nearly all the mass, forward KL and cross-entropy on its answer pull the same way."""
    from shifu.logprobs import unpack_logprobs

    mass, top1, chosen, chosen_is_top = [], [], [], []
    for ans in load_recording(lang)["answers"]:
        if ans["logprobs"]:
            _, lp, _, cand_lp = unpack_logprobs(base64.b64decode(ans["logprobs"]))
            p = np.exp(cand_lp.astype(np.float64))
            mass += list(p.sum(1))
            top1 += list(p.max(1))
            chosen += list(np.exp(lp.astype(np.float64)))
            chosen_is_top += list(lp >= cand_lp.max(1) - 1e-6)
    mass, top1 = np.array(mass), np.array(top1)
    return {"tokens": len(mass), "top_k_mass": float(mass.mean()), "top1_prob": float(top1.mean()),
            "top1_median": float(np.median(top1)), "confident": float((top1 > 0.9).mean()),
            "chosen_is_top1": float(np.mean(chosen_is_top)), "off_answer": float(1 - np.mean(chosen))}


# ---- the report ---------------------------------------------------------------------------------

NAMES = {"base": "base (no training)", "sft": "fine-tuning alone (kd_ratio 0)",
         "kd": "+ distillation (kd_ratio 0.5, forward KL)", "kd-reverse": "+ distillation (kd_ratio 0.5, reverse KL)",
         "kd-0.9": "+ distillation (kd_ratio 0.9, forward KL)", "kd-t2": "+ distillation (kd_ratio 0.5, T = 2)",
         "sft-lr5e-5": "fine-tuning alone, lr 5e-5", "kd-lr5e-5": "+ distillation (kd_ratio 0.5), lr 5e-5",
         "sft-24steps": "fine-tuning alone, 24 steps", "kd-24steps": "+ distillation (kd_ratio 0.5), 24 steps",
         "sft-48steps": "fine-tuning alone, 48 steps", "kd-48steps": "+ distillation (kd_ratio 0.5), 48 steps"}


def _ci(m: dict, key: str, digits: int = 3) -> str:
    if key not in m:
        return "n/a"
    lo, hi = m[key + "_ci"]
    return f"{m[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _delta(d: dict, key: str, digits: int = 3) -> str:
    if key not in d:
        return "n/a"
    c = d[key]
    if not c["ci"]:
        return f"{c['change']:+.{digits}f} (one example: no interval)"
    lo, hi = c["ci"]
    word = {"better": "**better**", "worse": "worse"}.get(c["verdict"], "no measurable change")
    return f"{c['change']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {word}"


def _new_tokens(r: dict) -> int:
    return r["new_tokens"]


def _coverage(r: dict) -> float | None:
    return next((c for c in r["kd_coverage"].values() if c), None)


def table(student: str, r: dict) -> list[str]:
    data = "; ".join(f"{g}: {d['train_examples']} training examples, {d['eval_examples']} held-out ones from "
                     f"{d['eval_chunks']} held-out chunks ({d['rejected']} teacher answers rejected by the dataset stage)"
                     for g, d in r["dataset"].items())
    lines = [f"### {LABELS[student]}", "", f"Data, {data}. Training time: "
             + ", ".join(f"{n} {s} s" for n, s in r["train_s"].items()) + f"; scoring and generation {r['measure_s']} s. "
             f"Share of training answer tokens with a teacher distribution: {100 * (_coverage(r) or 0):.1f}%.", ""]
    for lang, m in r["langs"].items():
        base = m["models"]["base"]
        lines += [f"**{lang}**: {m['examples']} held-out examples from {m['chunks']} chunks, {base['tokens']} answer "
                  f"tokens, {base['teacher_tokens']} with a teacher distribution (coverage "
                  f"{100 * (m['kd_coverage'] or 0):.1f}%); ROUGE-L on {m['generated']} greedy answers of "
                  f"{_new_tokens(r)} new tokens.", "",
                  "| student | KL(teacher ‖ student) | NLL of teacher answers | top-1 agreement | ROUGE-L vs teacher |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, f in m["models"].items():
            lines.append(f"| {NAMES.get(name, name)} | {_ci(f, 'kl')} | {_ci(f, 'nll')} | {_ci(f, 'top1')} | "
                         f"{_ci(f, 'rouge_l', 1)} |")
        lines += ["", "| change of | against | Δ KL | Δ NLL | Δ top-1 | Δ ROUGE-L |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for name, dd in m.get("vs_sft", {}).items():
            b = dd.get("against", "sft")
            lines.append(f"| {NAMES.get(name, name)} | {NAMES.get(b, b)} | {_delta(dd, 'kl')} | {_delta(dd, 'nll')} | "
                         f"{_delta(dd, 'top1')} | {_delta(dd, 'rouge_l', 1)} |")
        lines.append("")
    return lines


TITLES = {"quality": "base, fine-tuning alone, fine-tuning + distillation",
          "quality_sweep": "the sweep (learning rate, kd_ratio, temperature, steps)",
          "quality_steps": "Qwen 0.5B at 24 steps"}


def render(results: dict, command: str) -> str:
    a = results["args"]
    title = TITLES.get(results.get("tag", "quality"), results.get("tag"))
    lines = [f"## Distillation quality: {title} (issue 14)", "",
             f"Command: `{command}`  ",
             f"Machine: {results['machine']}  ",
             f"Wall time: {results['seconds'] // 60} min {results['seconds'] % 60} s for the whole run (no teacher: "
             "it reads the recording in bench/data/, made by scripts/record_teacher.py).  ",
             f"Every trained student: the same examples in the same order, {a['steps']} optimizer steps of batch "
             f"{a['batch_size']}, learning rate {a['lr']:g} (a variant named for its steps or learning rate differs there), "
             "no warm-up, LoRA r=8 alpha 16 all-linear, seed 7, fp32. "
             "Figures on held-out chunks' teacher answers, teacher-forced, token-averaged, with a bootstrap 95% "
             "interval over held-out examples; changes are paired (same examples). KL and top-1 count the tokens "
             "that have a teacher distribution.", ""]
    for student in results["students"]:
        lines += table(student, results[student])
    if results.get("teacher"):
        lines += ["### The teacher's distributions (the recording)", "",
                  "| language | answer tokens | mass in the top 20 | mean top-1 probability | median | "
                  "positions with top-1 > 0.9 | answer token = teacher's top-1 | mass off the answer token |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {g} | {t['tokens']} | {t['top_k_mass']:.3f} | {t['top1_prob']:.3f} | {t['top1_median']:.3f} | "
                  f"{100 * t['confident']:.0f}% | {100 * t['chosen_is_top1']:.0f}% | {t['off_answer']:.3f} |" for g, t in results["teacher"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from shifu.progress import setup_logging

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", default="qwen0.5b,smollm2-135m")
    p.add_argument("--langs", default="zh,en")
    p.add_argument("--variants", default="sft,kd,kd-reverse", help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--variants-for", action="append", default=[], metavar="STUDENT=LIST",
                   help="other variants for one student, e.g. qwen0.5b=sft,kd (repeatable)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-held", type=int, default=44, help="held-out examples scored per language, at most")
    p.add_argument("--generate", type=int, default=4, help="held-out prompts answered per language for ROUGE-L")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--reuse", action="store_true", help="keep adapters an earlier run trained from the same settings")
    p.add_argument("--tag", default="quality", help="names the results file and the docs/BENCHMARKS.md section")
    p.add_argument("--render-only", action="store_true")
    a = p.parse_args()
    a.variants = a.variants.split(",")
    a.variants_for = {k: v.split(",") for k, v in (x.split("=", 1) for x in a.variants_for)}
    a.langs = tuple(a.langs.split(","))
    setup_logging()
    command = " ".join([".venv/bin/python bench/quality.py",
                        *[x for x in sys.argv[1:] if x not in ("--render-only", "--reuse")]])
    out_json = RUNS / f"{a.tag}.json"
    if a.render_only:
        results = json.loads(out_json.read_text())
        results["teacher"] = {g: teacher_shape(g) for g in results.get("teacher", {})}  # from the recording
    else:
        t0 = time.time()
        results = {"machine": machine("torch", "transformers", "peft"), "students": a.students.split(","),
                   "args": {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr}, "tag": a.tag,
                   "teacher": {g: teacher_shape(g) for g in a.langs}}
        for student in results["students"]:
            results[student] = run_student(student, a)
            results["seconds"] = round(time.time() - t0)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=1))
    text = render(results, command)
    write_section(a.tag, text)
    print(text)


if __name__ == "__main__":
    main()
