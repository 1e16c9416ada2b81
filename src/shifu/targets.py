"""The teacher's token distributions for every training example, built once and kept on disk.

    targets, info = build_targets(cfg, tok, train_examples, encoded)   # None when distilling text only

Sources (`distill.source`):
- api: the top-k logprobs the teacher server returned, stored with each answer in teacher.sqlite,
  aligned to the student's tokens (shifu.align): exact ids when both share a tokenizer.
- local: a white-box Hugging Face teacher with the student's tokenizer, run once over the encoded
  examples; its top `local_top_k` per answer token is written to disk and reused every epoch.
- none: sequence-level distillation only (fine-tuning on the teacher's text).
- auto: api when the teacher was asked for logprobs, else none.
"""

from __future__ import annotations

import logging

import numpy as np

from shifu.align import TargetWriter, Targets, align, student_vocab
from shifu.config import Config
from shifu.encode import Encoded
from shifu.errors import UserError
from shifu.files import atomic_dir, hash_obj, read_jsonl
from shifu.models import token_bytes_table

log = logging.getLogger("shifu")


def resolve_source(cfg: Config, scoring: bool = False) -> str:
    """Training with kd_ratio 0 needs no teacher rows; scoring against the teacher still does."""
    if cfg.distill.kd_ratio == 0 and not scoring:
        return "none"
    if cfg.distill.source == "auto":
        return "api" if cfg.teacher.top_logprobs > 0 else "none"
    return cfg.distill.source


def _answer_keys(cfg: Config) -> dict[tuple, str]:
    path = cfg.work / "examples.jsonl"
    if not path.exists():
        return {}
    return {(e["instruction"], e["input"], e["output"]): e["key"] for e in read_jsonl(path) if e.get("key")}


def _build_from_api(cfg: Config, tok, examples: list[dict], enc: Encoded, writer: TargetWriter) -> None:
    from shifu.store import Store
    from shifu.teacher import unpack_logprobs

    keys = _answer_keys(cfg)
    table = token_bytes_table(tok)
    vocab = student_vocab(table, set(tok.all_special_ids))
    store = Store(cfg.work / "teacher.sqlite")
    try:
        for i, ex in enumerate(examples):
            key = keys.get((ex["instruction"], ex["input"], ex["output"]))
            blob = store.logprobs(key) if key else None
            if blob is None:
                continue
            tokens, lp, cand, cand_lp = unpack_logprobs(blob)
            ids = enc.input_ids[i][enc.answer_start[i]:].tolist()
            rows = align(ex["output"].encode(), [table[t] for t in ids], ids, tokens, lp, cand, cand_lp,
                         vocab, writer.width)
            writer.add(i, *rows)
    finally:
        store.close()


def _build_from_local(cfg: Config, tok, enc: Encoded, writer: TargetWriter) -> None:
    import torch

    from shifu.models import load_causal_lm, load_tokenizer

    name = cfg.distill.local_teacher
    teacher_tok = load_tokenizer(name, cfg.teacher.trust_remote_code)
    if teacher_tok.get_vocab() != tok.get_vocab():
        raise UserError(f"distill.local_teacher {name!r} has a different tokenizer from the student; "
                        "a white-box teacher must share it (use distill.source=api for other teachers)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    teacher = load_causal_lm(name, cfg.teacher.trust_remote_code, dtype).to(device).eval()
    k = writer.width
    with torch.no_grad():
        for i, ids in enumerate(enc.input_ids):
            start = int(enc.answer_start[i])
            keep = torch.zeros(1, len(ids), dtype=torch.bool)
            keep[0, start - 1:len(ids) - 1] = True  # positions that predict the answer tokens
            x = torch.as_tensor(ids, dtype=torch.long, device=device)[None]
            logits = teacher(input_ids=x, logits_to_keep=keep.to(device)).logits.reshape(keep.sum(), -1)
            top = torch.log_softmax(logits.float(), -1).topk(k, -1)
            writer.add(i, top.indices.cpu().numpy().astype(np.int32), top.values.cpu().numpy())
    del teacher


def build_targets(cfg: Config, tok, examples: list[dict], enc: Encoded,
                  scoring: bool = False) -> tuple[Targets | None, dict]:
    source = resolve_source(cfg, scoring)
    if source == "none":
        return None, {"kd_source": "none"}
    width = cfg.teacher.top_logprobs + 1 if source == "api" else cfg.distill.local_top_k
    teacher_id = [cfg.teacher.base_url, cfg.teacher.model] if source == "api" else [cfg.distill.local_teacher]
    key = hash_obj([source, width, teacher_id, tok.name_or_path, len(tok),
                    [x.tolist() for x in enc.input_ids], enc.answer_start.tolist()])
    folder = cfg.work / "kd" / f"{source}-{key[:16]}"
    if not (folder / "index.json").exists():
        capacity = int(sum(len(x) - s for x, s in zip(enc.input_ids, enc.answer_start)))
        with atomic_dir(folder) as tmp:
            writer = TargetWriter(tmp, capacity, width)
            if source == "api":
                _build_from_api(cfg, tok, examples, enc, writer)
            else:
                _build_from_local(cfg, tok, enc, writer)
            writer.close()
            del writer  # release the memmaps before the folder is renamed
    targets = Targets(folder)
    if source == "api" and not targets.index:
        log.warning("no stored teacher logprobs match the training examples; training on the teacher's text only")
        return None, {"kd_source": "none (no logprobs stored)"}
    log.info("teacher distributions for %.1f%% of answer tokens (%s)", 100 * targets.coverage, source)
    return targets, {"kd_source": source, "kd_coverage": round(targets.coverage, 4),
                     "kd_examples": len(targets.index)}
