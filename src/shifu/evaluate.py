"""Stage 7: is the student better, at what, and did it forget anything?

    shifu eval configs/demo.yaml      # <work_dir>/eval/report.json, report.html, samples.md

Before training (adapter off) and after, with a paired bootstrap interval on every change (a change
inside its interval is reported as no measurable change):
- held-out chunks, teacher-forced: loss and perplexity on the teacher's answers; where teacher
  distributions exist, top-1 agreement with the teacher and the KL from teacher to student;
- held-out prompts answered by base and trained student: a judge's pairwise verdicts, trained vs
  base and trained vs the teacher's own answer (shifu.judge), and ROUGE-L / BLEU against the
  teacher's answer (shifu.overlap);
- knowledge: closed-book questions about chunks the student was trained on, answered from memory
  and judged against the passage, reported apart from the held-out figures;
- general ability, optionally: lm-evaluation-harness tasks on base and merged student (shifu.general).
Scoring and generation run in batches in shifu.device's placement: sorted by length, right-padded
for scoring (logits only at answer positions), left-padded for generation with the KV cache.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shifu.config import Config
from shifu.encode import encode_examples
from shifu.errors import TeacherError, UserError
from shifu.files import read_jsonl, write_json, write_jsonl, write_text
from shifu.losses import distill_loss
from shifu.models import end_token_ids, load_causal_lm, load_tokenizer
from shifu.reasoning import reasoning_tag, strip_reasoning
from shifu.stats import paired_change
from shifu.tasks import format_prompt

log = logging.getLogger("shifu")
COLUMNS = ("ce", "tokens", "agree", "kl", "kd_tokens")  # per-example sums from `score`


def eval_batch_size(cfg: Config, device: torch.device) -> int:
    return cfg.eval.batch_size or (16 if device.type == "cuda" else 4)


def batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices grouped `size` at a time, longest first, so a batch pads to similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[k:k + size] for k in range(0, len(order), size)]


# ---- teacher-forced scoring ---------------------------------------------------------------------

def _score_batch(model, enc, targets, idx: list[int], pad_id: int, device) -> np.ndarray:
    longest = max(len(enc.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)  # positions that predict an answer token
    for row, i in enumerate(idx):
        x, start = enc.input_ids[i], int(enc.answer_start[i])
        ids[row, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[row, :len(x)] = 1
        keep[row, start - 1:len(x) - 1] = True
    target = ids[:, 1:][keep[:, :-1]].to(device)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device),
                   use_cache=False).logits  # (answer tokens, vocab): only the positions in `keep`
    logits = logits.reshape(len(target), -1).float()
    ce = F.cross_entropy(logits, target, reduction="none")
    out = np.zeros((len(idx), len(COLUMNS)))
    offset = 0
    for row, i in enumerate(idx):
        n = int(keep[row].sum())
        lg = logits[offset:offset + n]
        out[row, :2] = ce[offset:offset + n].sum().item(), n
        rows = targets.get(i) if targets is not None else None
        if rows is not None:
            m = min(len(rows[0]), n)
            ids_t = torch.as_tensor(rows[0][:m], device=device).long()
            lps_t = torch.as_tensor(rows[1][:m], device=device)
            has = (ids_t >= 0).any(-1)
            if has.any():
                out[row, 2] = (lg[:m][has].argmax(-1) == ids_t[has, 0]).sum().item()
                out[row, 3] = distill_loss(lg[:m][has], ids_t[has], lps_t[has]).sum().item()
                out[row, 4] = has.sum().item()
        offset += n
    return out


def score(model, enc, targets, pad_id: int, batch: int, device) -> np.ndarray:
    """Per example: CE summed over answer tokens, answer tokens, top-1 agreements with the teacher,
    KL summed over tokens with a teacher distribution, and their count (COLUMNS)."""
    out = np.zeros((len(enc), len(COLUMNS)))
    with torch.no_grad():
        for idx in batches([len(x) for x in enc.input_ids], batch):
            out[idx] = _score_batch(model, enc, targets, idx, pad_id, device)
    return out


def summarize(rows: np.ndarray) -> dict:
    ce, n, agree, kl, n_kd = rows.sum(0)
    loss = ce / max(n, 1)
    out = {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3), "tokens": int(n)}
    if n_kd:
        out.update(top1_agreement=round(agree / n_kd, 4), kl_teacher_student=round(kl / n_kd, 4),
                   teacher_tokens=int(n_kd))
    return out


def score_changes(before: np.ndarray, after: np.ndarray, cfg: Config) -> dict:
    """Paired intervals, resampling held-out examples: token-averaged, as the figures themselves."""
    kw = {"samples": cfg.eval.bootstrap_samples, "seed": cfg.eval.seed}
    out = {"loss": paired_change(before[:, 0], after[:, 0], before[:, 1], higher_is_better=False, **kw)}
    if before[:, 4].sum():
        out["top1_agreement"] = paired_change(before[:, 2], after[:, 2], before[:, 4], **kw)
        out["kl_teacher_student"] = paired_change(before[:, 3], after[:, 3], before[:, 4],
                                                  higher_is_better=False, **kw)
    return out


# ---- generation ---------------------------------------------------------------------------------

def chat_text(tok, prompt: str, system_prompt: str | None) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(model, tok, prompts: list[str], max_new_tokens: int, system_prompt: str | None,
             batch: int, device) -> list[str]:
    """Greedy answers, in batches of similar length, left-padded so every row ends at the prompt."""
    texts = [chat_text(tok, p, system_prompt) for p in prompts]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out: list[str] = [""] * len(prompts)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        with torch.no_grad():
            for idx in batches([len(x) for x in ids], batch):
                enc = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     eos_token_id=end_token_ids(tok), pad_token_id=tok.pad_token_id)
                for row, i in enumerate(idx):
                    out[i] = tok.decode(gen[row, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    finally:
        tok.padding_side = side
    return out


# ---- what to ask --------------------------------------------------------------------------------

def knowledge_questions(tasks: list[dict], examples: list[dict], get, cfg: Config, n: int) -> list[dict]:
    """Up to n questions the teacher proposed about chunks with training examples (never held-out
    ones), spread over chunks in a seeded order: {chunk_id, question, lang}."""
    from shifu.tasks import questions_for

    trained = {e["chunk_id"] for e in examples if e.get("split") == "train"}
    held = {e["chunk_id"] for e in examples if e.get("split") == "eval"}
    found = []
    for task in tasks:
        if task["source"] != "teacher" or task.get("parse") != "json_qa" or task["chunk_id"] not in trained - held:
            continue
        questions, _ = questions_for(task, cfg, get)
        for rank, q in enumerate(questions or []):
            found.append((rank, hashlib.sha256(f"{cfg.eval.seed}:{task['chunk_id']}:{q}".encode()).hexdigest(),
                          {"chunk_id": task["chunk_id"], "question": q, "lang": task["lang"]}))
    found.sort(key=lambda t: t[:2])  # first questions of every chunk before second ones
    return [t[2] for t in found[:n]]


def _read_optional(path: Path) -> list[dict]:
    return list(read_jsonl(path)) if path.exists() else []


def _knowledge_set(cfg: Config) -> list[dict]:
    from shifu.store import Store

    if not cfg.eval.knowledge_questions or not (cfg.store_path).exists():
        return []
    tasks, examples = _read_optional(cfg.tasks_path), _read_optional(cfg.examples_path)
    with Store(cfg.store_path) as store:
        return knowledge_questions(tasks, examples, store.get, cfg, cfg.eval.knowledge_questions)


# ---- the stage ----------------------------------------------------------------------------------

def load_student(cfg: Config):
    from peft import PeftModel

    from shifu.device import placement

    where = placement(cfg.train.precision)
    tok = load_tokenizer(cfg.output_dir, cfg.trust_remote_code)
    base = load_causal_lm(cfg.model_name, cfg.trust_remote_code, dtype=where.dtype).to(where.device)
    return tok, PeftModel.from_pretrained(base, cfg.output_dir).eval(), where.device


def _answers(model, tok, prompts: list[str], cfg: Config, batch: int, device) -> dict[str, list[str]]:
    args = (cfg.eval.max_new_tokens, cfg.train.system_prompt, batch, device)
    with model.disable_adapter():
        base = generate(model, tok, prompts, *args)
    trained = generate(model, tok, prompts, *args)
    # a thinking student (its template's default, or a trained <reasoning_tag>) is scored on its final answer
    tag = reasoning_tag(tok, cfg.train.system_prompt, cfg.train.reasoning_tag)
    return {"base": [strip_reasoning(a, tag) for a in base], "trained": [strip_reasoning(a, tag) for a in trained]}


def _judge(cfg: Config, held_samples: list[dict], knowledge: list[dict]) -> dict:
    from shifu.judge import Pair, judge_pairs
    from shifu.stats import win_rates

    sets = {"vs_base": [], "vs_teacher": [], "knowledge": []}
    for k, s in enumerate(held_samples[: cfg.eval.generate_examples]):  # the rest are shown, not judged
        common = {"passage": s["passage"], "prompt": s["prompt"], "category": s["category"], "lang": s["lang"]}
        sets["vs_base"].append(Pair(id=f"base:{k}", first=s["trained"], second=s["base"], **common))
        sets["vs_teacher"].append(Pair(id=f"teacher:{k}", first=s["trained"], second=s["teacher"], **common))
    for k, q in enumerate(knowledge):
        sets["knowledge"].append(Pair(id=f"known:{k}", passage=q["passage"], prompt=q["question"], category="问答",
                                      lang=q["lang"], first=q["trained"], second=q["base"], closed_book=True))
    flat = [p for pairs in sets.values() for p in pairs]
    try:
        records, calls = judge_pairs(cfg, flat)
    except TeacherError as err:
        raise TeacherError(f"judge: {err} (eval.judge: false evaluates without one)") from None
    out, start = {"calls": calls, "model": calls.get("model")}, 0
    for name, pairs in sets.items():
        recs = records[start:start + len(pairs)]
        start += len(pairs)
        out[name] = {**win_rates([r["outcome"] for r in recs], cfg.eval.bootstrap_samples, cfg.eval.seed),
                     "records": recs}
    return out


def spread(held: list[dict], n: int) -> list[dict]:
    """n held-out examples taken in turn from each (chunk, kind), so a few samples cover many chunks
    and both task kinds instead of the first chunk's questions."""
    groups: dict[tuple, list[dict]] = {}
    for ex in held:
        groups.setdefault((ex["chunk_id"], ex["category"]), []).append(ex)
    out, rank = [], 0
    while len(out) < min(n, len(held)):
        out += [g[rank] for g in groups.values() if rank < len(g)][: n - len(out)]
        rank += 1
    return out


def _score_both(cfg: Config, model, tok, held: list[dict], batch: int, device) -> tuple[np.ndarray, np.ndarray, dict]:
    from shifu.targets import build_targets

    enc = encode_examples(tok, held, cfg.max_length, cfg.train.system_prompt, cfg.work / "cache")
    targets, kd_info = build_targets(cfg, tok, held, enc, scoring=True)
    with model.disable_adapter():
        before = score(model, enc, targets, tok.pad_token_id, batch, device)
    return before, score(model, enc, targets, tok.pad_token_id, batch, device), kd_info


def _answer_both(cfg: Config, model, tok, held: list[dict], batch: int, device) -> tuple[list[dict], list[dict]]:
    """Base and trained answers to held-out prompts (with the teacher's) and to knowledge questions."""
    chunks = {c["chunk_id"]: c for c in _read_optional(cfg.chunks_path)}
    answered = spread(held, max(cfg.eval.generate_examples, cfg.eval.num_samples))
    knowledge = _knowledge_set(cfg)
    prompts = [format_prompt(ex["instruction"], ex["input"]) for ex in answered]
    got = _answers(model, tok, prompts + [format_prompt(q["question"]) for q in knowledge], cfg, batch, device)
    samples = []
    for k, ex in enumerate(answered):
        chunk = chunks.get(ex["chunk_id"], {})
        samples.append({"chunk_id": ex["chunk_id"], "category": ex["category"], "prompt": prompts[k],
                        "lang": chunk.get("lang", "zh"), "passage": chunk.get("text", ex["input"]),
                        "base": got["base"][k], "trained": got["trained"][k], "teacher": ex["output"]})
    for k, q in enumerate(knowledge, len(answered)):
        q.update(base=got["base"][k], trained=got["trained"][k], passage=chunks.get(q["chunk_id"], {}).get("text", ""))
    return samples, knowledge


def run_eval(cfg: Config) -> dict:
    if not cfg.eval_jsonl_path.exists():
        raise UserError(f"{cfg.eval_jsonl_path}: no held-out examples; run `shifu dataset` with eval.eval_ratio > 0")
    held = list(read_jsonl(cfg.eval_jsonl_path))[: cfg.eval.max_examples]
    if not held:
        return {"held_out_examples": 0, "note": "eval.eval_ratio left no held-out chunk"}
    if not (Path(cfg.output_dir) / "adapter_config.json").exists():
        raise UserError(f"{cfg.output_dir}: no trained adapter; run `shifu train` first")
    if cfg.eval.judge:
        from shifu.judge import check_judge

        check_judge(cfg)
    clock = [time.time()]
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        times[name] = round(time.time() - clock[0], 2)
        clock[0] = time.time()

    tok, model, device = load_student(cfg)
    batch = eval_batch_size(cfg, device)
    before, after, kd_info = _score_both(cfg, model, tok, held, batch, device)
    lap("scoring")
    samples, knowledge = _answer_both(cfg, model, tok, held, batch, device)
    lap("generation")
    del model
    report = {"held_out_examples": len(held), "before": summarize(before), "after": summarize(after),
              "changes": score_changes(before, after, cfg), **kd_info}
    report["loss_change"] = round(report["after"]["loss"] - report["before"]["loss"], 4)
    report["overlap"] = _overlap(samples, cfg)
    report["judge"] = _judge(cfg, samples, knowledge) if cfg.eval.judge else {"skipped": "eval.judge is false"}
    lap("judge")
    report["general"] = _general(cfg)
    lap("general")
    report.update(answered_examples=len(samples), knowledge_questions=len(knowledge), seconds=times,
                  batch_size=batch, device=str(device))
    _write(cfg, report, samples, knowledge)
    return _for_summary(report)


def _overlap(samples: list[dict], cfg: Config) -> dict:
    from shifu.overlap import overlap_scores

    return overlap_scores(samples, cfg.eval.bootstrap_samples, cfg.eval.seed)


def _general(cfg: Config) -> dict:
    from shifu.general import run_general

    def load(path: str):
        from shifu.device import placement

        where = placement(cfg.train.precision)
        tok = load_tokenizer(path, cfg.trust_remote_code)
        return load_causal_lm(path, cfg.trust_remote_code, dtype=where.dtype).to(where.device).eval(), tok

    return run_general(cfg, load)


def _write(cfg: Config, report: dict, samples: list[dict], knowledge: list[dict]) -> None:
    from shifu.report_html import render_report

    folder = cfg.eval_dir
    write_json(folder / "report.json", report)
    write_jsonl(folder / "samples.jsonl", samples)
    write_jsonl(folder / "knowledge.jsonl", knowledge)
    write_text(folder / "samples.md", samples_markdown(samples[: cfg.eval.num_samples]))
    write_text(folder / "report.html", render_report(cfg, report, samples, knowledge))


def _for_summary(report: dict) -> dict:
    """The run summary keeps the figures, not the per-pair verdicts."""
    out = dict(report)
    judge = report.get("judge", {})
    out["judge"] = {k: ({kk: vv for kk, vv in v.items() if kk != "records"} if isinstance(v, dict) else v)
                    for k, v in judge.items()}
    return out


def samples_markdown(samples: list[dict]) -> str:
    parts = ["# Held-out samples: base vs trained vs teacher\n"]
    for k, s in enumerate(samples, 1):
        parts.append(f"## {k}. {s['category']} (chunk {s['chunk_id']})\n\n**Prompt**\n\n{s['prompt']}\n\n"
                     f"**Base student**\n\n{s['base']}\n\n**Trained student**\n\n{s['trained']}\n\n"
                     f"**Teacher**\n\n{s['teacher']}\n")
    return "\n".join(parts)
