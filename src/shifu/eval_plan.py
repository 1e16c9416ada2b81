"""Before anything runs: what one `shifu eval` will generate, ask the judge and pay, and about how
long the student's side takes. `shifu estimate` prints it (the evaluation table).

    eval_estimate(cfg)   # {held_out_examples_scored, prompts_answered, judge_requests, judge_max_cost, ...}
"""

from __future__ import annotations

import math

import torch

from shifu.config import Config
from shifu.errors import UserError
from shifu.teacher import estimate_tokens


def eval_sizes(cfg: Config) -> dict:
    """Expected held-out examples, answered prompts and knowledge questions, from chunks.jsonl
    (the estimate runs the chunk stage first): what one `shifu eval` will generate and judge."""
    from shifu.files import read_jsonl

    path = cfg.chunks_path
    chunks = list(read_jsonl(path)) if path.exists() else []
    per_chunk = cfg.tasks.qa_per_chunk * cfg.enable_qa + cfg.enable_article
    held_chunks = max(1, round(len(chunks) * cfg.eval.eval_ratio)) if cfg.eval.eval_ratio > 0 and len(chunks) > 1 else 0
    held = min(held_chunks * per_chunk, cfg.eval.max_examples)
    trained_questions = (len(chunks) - held_chunks) * cfg.tasks.qa_per_chunk * cfg.enable_qa
    passage = sum(estimate_tokens(c["text"]) for c in chunks) / max(len(chunks), 1)
    return {"held_out_examples": held, "answered": min(held, max(cfg.eval.generate_examples, cfg.eval.num_samples)),
            "judged": min(held, cfg.eval.generate_examples),
            "knowledge": min(cfg.eval.knowledge_questions, trained_questions), "passage_tokens": passage}


# Rough machine speeds for the time estimate: generation is bound by reading the weights once per
# step (memory bandwidth), teacher-forced scoring by arithmetic. Effective, not peak, figures.
SPEED = {"cpu": {"bytes_per_s": 20e9, "flops": 0.3e12}, "cuda": {"bytes_per_s": 1.5e12, "flops": 150e12}}


def eval_estimate(cfg: Config) -> dict:
    """What `shifu eval` will ask the judge and pay, and about how long the student's side takes."""
    from shifu.device import placement
    from shifu.evaluate import eval_batch_size
    from shifu.judge import judge_estimate

    sizes = eval_sizes(cfg)
    where = placement(cfg.train.precision)
    batch = eval_batch_size(cfg, where.device)
    out = {"held_out_examples_scored": sizes["held_out_examples"], "prompts_answered": sizes["answered"],
           "knowledge_questions": sizes["knowledge"], **judge_estimate(cfg)}
    params = _student_params(cfg)
    if params is None:
        return {**out, "student_seconds": "student config not readable here; give a local folder for model_name"}
    speed = SPEED["cuda" if where.device.type == "cuda" else "cpu"]
    weight_bytes = params * torch.finfo(where.dtype).bits / 8
    prompts = sizes["answered"] + sizes["knowledge"]
    steps = 2 * math.ceil(prompts / batch) * cfg.eval.max_new_tokens  # base and trained
    scored = 2 * sizes["held_out_examples"] * cfg.max_length * 0.75  # before and after, ~3/4 full
    seconds = steps * weight_bytes / speed["bytes_per_s"] + 2 * params * scored / speed["flops"]
    return {**out, "student_seconds": round(seconds, 1),
            "time_assumes": f"{where.device.type}, {str(where.dtype).replace('torch.', '')}, batch {batch}, "
                            f"{speed['bytes_per_s'] / 1e9:g} GB/s, {speed['flops'] / 1e12:g} TFLOP/s; judge time not included"}


def _student_params(cfg: Config) -> int | None:
    from shifu.models import meta_causal_lm, student_config

    try:  # the same offline-friendly config lookup as the memory estimate; no weights are read
        model = meta_causal_lm(student_config(cfg.model_name, cfg.trust_remote_code), torch.float32,
                               cfg.trust_remote_code)
    except UserError:
        return None
    return sum(p.numel() for p in model.parameters())
