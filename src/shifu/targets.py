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

from shifu.align import Targets, TargetWriter, align, student_vocab
from shifu.config import Config
from shifu.encode import Encoded
from shifu.errors import UserError
from shifu.files import atomic_dir, build_lock, hash_obj, read_jsonl
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
    path = cfg.examples_path
    if not path.exists():
        return {}
    return {(e["instruction"], e["input"], e["output"]): e["key"] for e in read_jsonl(path) if e.get("key")}


def _build_from_api(cfg: Config, tok, examples: list[dict], enc: Encoded, writer: TargetWriter) -> None:
    from shifu.logprobs import unpack_logprobs
    from shifu.store import Store

    keys = _answer_keys(cfg)
    table = token_bytes_table(tok)
    vocab = student_vocab(table, set(tok.all_special_ids))
    with Store(cfg.store_path) as store:
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


def _build_from_local(cfg: Config, tok, enc: Encoded, writer: TargetWriter) -> None:
    from shifu.device import placement
    from shifu.models import load_causal_lm, load_tokenizer

    name = cfg.distill.local_teacher
    teacher_tok = load_tokenizer(name, cfg.teacher.trust_remote_code)
    if teacher_tok.get_vocab() != tok.get_vocab():
        raise UserError(f"distill.local_teacher {name!r} has a different tokenizer from the student; "
                        "a white-box teacher must share it (use distill.source=api for other teachers)")
    where = placement(cfg.train.precision)  # the teacher in the student's dtype, on this process's GPU
    device_map = where.device_map if where.device.type == "cuda" else None
    teacher = load_causal_lm(name, cfg.teacher.trust_remote_code, where.dtype, device_map=device_map).eval()
    budget = LOCAL_BATCH_TOKENS if where.device.type == "cuda" else LOCAL_BATCH_TOKENS // 8
    for batch in length_batches([len(x) for x in enc.input_ids], budget):
        rows = local_top_k(teacher, [enc.input_ids[i] for i in batch], [int(enc.answer_start[i]) for i in batch],
                           writer.width, where.device)
        for i, (ids, lps) in zip(batch, rows):
            writer.add(i, ids, lps)
    del teacher


LOCAL_BATCH_TOKENS = 16384  # padded tokens per teacher forward pass on a GPU (an eighth on CPU)


def length_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Example indices sorted by length, cut into batches of at most `budget` padded tokens."""
    batches, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if cur and (len(cur) + 1) * lengths[i] > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + [cur] if cur else batches


def local_top_k(teacher, seqs: list, starts: list[int], k: int, device) -> list[tuple[np.ndarray, np.ndarray]]:
    """The teacher's top-k log-probs at the positions that predict each answer token, for a batch of
    right-padded sequences; the head runs in chunks, so no batch x vocabulary logits are held."""
    import torch

    from shifu.losses import LOGIT_CHUNK

    longest = max(len(x) for x in seqs)
    x = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros_like(x)
    keep = torch.zeros_like(x, dtype=torch.bool)
    for r, (ids, start) in enumerate(zip(seqs, starts)):
        x[r, :len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        mask[r, :len(ids)] = 1
        keep[r, start - 1:len(ids) - 1] = True
    with torch.no_grad():
        out = teacher(input_ids=x.to(device), attention_mask=mask.to(device), output_hidden_states=-1,
                      logits_to_keep=torch.zeros_like(keep).to(device), use_cache=False)
        hidden = out.hidden_states[-1][keep.to(device)]
        head = teacher.get_output_embeddings()
        tops = [torch.log_softmax(head(h).float(), -1).topk(k, -1) for h in hidden.split(LOGIT_CHUNK)]
    ids = torch.cat([t.indices for t in tops]).cpu().numpy().astype(np.int32)
    lps = torch.cat([t.values for t in tops]).cpu().numpy()
    cuts = np.cumsum([len(s) - st for s, st in zip(seqs, starts)])[:-1]
    return list(zip(np.split(ids, cuts), np.split(lps, cuts)))


def _build(cfg: Config, tok, examples: list[dict], enc: Encoded, source: str, width: int, folder) -> None:
    capacity = int(sum(len(x) - s for x, s in zip(enc.input_ids, enc.answer_start)))
    with atomic_dir(folder) as tmp:
        writer = TargetWriter(tmp, capacity, width)
        if source == "api":
            _build_from_api(cfg, tok, examples, enc, writer)
        else:
            _build_from_local(cfg, tok, enc, writer)
        writer.close()
        del writer  # release the memmaps before the folder is renamed


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
    # Every rank of a launch gets here: the first builds, the others wait for it and read its folder.
    # A complete folder is never rebuilt or replaced (its name is the hash of what it holds).
    with build_lock(folder):
        if not (folder / "index.json").exists():
            _build(cfg, tok, examples, enc, source, width, folder)
    targets = Targets(folder)
    if source == "api" and not targets.index:
        log.warning("no stored teacher logprobs match the training examples; training on the teacher's text only")
        return None, {"kd_source": "none (no logprobs stored)"}
    log.info("teacher distributions for %.1f%% of answer tokens (%s)", 100 * targets.coverage, source)
    return targets, {"kd_source": source, "kd_coverage": round(targets.coverage, 4),
                     "kd_examples": len(targets.index)}
