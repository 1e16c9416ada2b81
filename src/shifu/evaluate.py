"""Stage 7: evidence that the student learned, on chunks it never saw in training.

    shifu eval configs/demo.yaml      # writes <work_dir>/eval/report.json and samples.md

For the held-out examples (split by chunk) it reports, before training (adapter off) and after:
- the student's mean loss per answer token on the teacher's answers, and its perplexity;
- where teacher distributions exist (top-k logprobs or a local teacher): top-1 agreement with the
  teacher and the teacher-forced KL from teacher to student over the teacher's top-k;
and writes a few held-out prompts with the base, trained and teacher answers side by side.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from shifu.config import Config
from shifu.encode import encode_examples
from shifu.errors import UserError
from shifu.files import read_jsonl, write_json, write_jsonl, write_text
from shifu.losses import distill_loss
from shifu.models import end_token_ids, load_causal_lm, load_tokenizer
from shifu.tasks import format_prompt


def score(model, enc, targets) -> dict:
    """Token-averaged CE, and against the teacher: top-1 agreement and forward KL on covered tokens."""
    ce_sum = n = agree = kl_sum = n_kd = 0.0
    with torch.no_grad():
        for i, ids in enumerate(enc.input_ids):
            start = int(enc.answer_start[i])
            x = torch.as_tensor(ids, dtype=torch.long)[None]
            logits = model(input_ids=x).logits[0, start - 1:len(ids) - 1].float()
            target = x[0, start:]
            ce_sum += F.cross_entropy(logits, target, reduction="sum").item()
            n += len(target)
            rows = targets.get(i) if targets is not None else None
            if rows is not None:
                m = min(len(rows[0]), len(target))
                ids_t, lps_t = torch.as_tensor(rows[0][:m]).long(), torch.as_tensor(rows[1][:m])
                has = (ids_t >= 0).any(-1)
                if has.any():
                    agree += (logits[:m][has].argmax(-1) == ids_t[has, 0]).sum().item()
                    kl_sum += distill_loss(logits[:m][has], ids_t[has], lps_t[has]).sum().item()
                    n_kd += has.sum().item()
    out = {"loss": round(ce_sum / max(n, 1), 4), "perplexity": round(math.exp(min(ce_sum / max(n, 1), 50)), 3),
           "tokens": int(n)}
    if n_kd:
        out.update(top1_agreement=round(agree / n_kd, 4), kl_teacher_student=round(kl_sum / n_kd, 4),
                   teacher_tokens=int(n_kd))
    return out


def generate(model, tok, prompt: str, max_new_tokens: int, system_prompt: str | None) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=end_token_ids(tok), pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def samples_markdown(samples: list[dict]) -> str:
    parts = ["# Held-out samples: base vs trained vs teacher\n"]
    for k, s in enumerate(samples, 1):
        parts.append(f"## {k}. {s['category']} (chunk {s['chunk_id']})\n\n**Prompt**\n\n{s['prompt']}\n\n"
                     f"**Base student**\n\n{s['base']}\n\n**Trained student**\n\n{s['trained']}\n\n"
                     f"**Teacher**\n\n{s['teacher']}\n")
    return "\n".join(parts)


def run_eval(cfg: Config) -> dict:
    from peft import PeftModel

    from shifu.targets import build_targets

    if not cfg.eval_jsonl_path.exists():
        raise UserError(f"{cfg.eval_jsonl_path}: no held-out examples; run `shifu dataset` with eval.eval_ratio > 0")
    held = list(read_jsonl(cfg.eval_jsonl_path))[: cfg.eval.max_examples]
    if not held:
        return {"held_out_examples": 0, "note": "eval.eval_ratio left no held-out chunk"}
    if not (Path(cfg.output_dir) / "adapter_config.json").exists():
        raise UserError(f"{cfg.output_dir}: no trained adapter; run `shifu train` first")
    tok = load_tokenizer(cfg.output_dir, cfg.trust_remote_code)
    model = PeftModel.from_pretrained(load_causal_lm(cfg.model_name, cfg.trust_remote_code), cfg.output_dir).eval()
    enc = encode_examples(tok, held, cfg.max_length, cfg.train.system_prompt, cfg.work / "cache")
    targets, kd_info = build_targets(cfg, tok, held, enc, scoring=True)
    with model.disable_adapter():
        before = score(model, enc, targets)
    after = score(model, enc, targets)
    samples = []
    for ex in held[: cfg.eval.num_samples]:
        prompt = format_prompt(ex["instruction"], ex["input"])
        with model.disable_adapter():
            base = generate(model, tok, prompt, cfg.eval.max_new_tokens, cfg.train.system_prompt)
        trained = generate(model, tok, prompt, cfg.eval.max_new_tokens, cfg.train.system_prompt)
        samples.append({"chunk_id": ex["chunk_id"], "category": ex["category"], "prompt": prompt,
                        "base": base, "trained": trained, "teacher": ex["output"]})
    report = {"held_out_examples": len(held), "before": before, "after": after,
              "loss_change": round(after["loss"] - before["loss"], 4), **kd_info}
    folder = cfg.work / "eval"
    write_json(folder / "report.json", report)
    write_jsonl(folder / "samples.jsonl", samples)
    write_text(folder / "samples.md", samples_markdown(samples))
    return report
