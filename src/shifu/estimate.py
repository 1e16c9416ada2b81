"""`shifu estimate`: what a run will cost before anything is spent.

    shifu estimate configs/deepseek-qwen2.5-7b.yaml

Teacher: runs the offline chunk and tasks stages, then counts requests, input tokens (with the
student's tokenizer when it loads locally, else a stated heuristic), expected and maximum output
tokens, and the price from `teacher.prices` at off-peak and peak rates, treating every input
token as a cache miss (the upper bound). Requests whose answers are already stored are left out,
so the estimate of a resumed run is what is left to pay.
Training: expected GPU memory for the configured student, LoRA, batch and max_length, broken
down into weights, adapter with its gradients and optimizer state, activations and logits.
The student is built on the meta device from its config, so no weights are loaded.
"""

from __future__ import annotations

import math

from rich.table import Table

from shifu.config import Config
from shifu.files import read_jsonl
from shifu.progress import console
from shifu.tasks import format_prompt
from shifu.teacher import estimate_tokens, price_of

GiB = 1024 ** 3
QUESTION_TOKENS = 40  # a proposed question, as observed with DeepSeek and Qwen teachers


def _counter(cfg: Config):
    try:
        from shifu.models import load_tokenizer

        tok = load_tokenizer(cfg.model_name, cfg.trust_remote_code)
        return (lambda s: len(tok(s, add_special_tokens=False)["input_ids"])), f"student tokenizer ({cfg.model_name})"
    except Exception:  # offline hub name, missing folder: fall back, and say so
        return estimate_tokens, "heuristic: 1 token per CJK character, 4 other characters per token"


def teacher_estimate(cfg: Config) -> dict:
    from shifu.pipeline import run_stage
    from shifu.store import Store
    from shifu.tasks import answer_requests, questions_for, task_request

    run_stage("chunk", cfg)
    run_stage("tasks", cfg)
    tasks = [t for t in read_jsonl(cfg.work / "tasks.jsonl") if t["source"] == "teacher"]
    count, counted_with = _counter(cfg)
    tc, k = cfg.teacher, cfg.tasks.qa_per_chunk
    store = Store(cfg.work / "teacher.sqlite") if (cfg.work / "teacher.sqlite").exists() else None
    get = store.get if store else (lambda key: None)
    out = tc.max_tokens * tc.expected_output_ratio
    requests = stored = inputs = expected_out = max_out = 0
    try:
        for t in tasks:
            prompt_tokens = count(format_prompt(t["instruction"], t["input"]))
            if get(task_request(t, cfg).key) is not None:  # a resumed run pays only for what is missing
                stored += 1
            else:
                requests += 1
                inputs += prompt_tokens
                expected_out += k * QUESTION_TOKENS if t["parse"] == "json_qa" else out
                max_out += tc.max_tokens
            if t["parse"] != "json_qa":
                continue
            # Then one answer per question, with the chunk: the real prompts once the questions are in.
            questions, _ = questions_for(t, cfg, get)
            if questions is None:
                prompts = [prompt_tokens + QUESTION_TOKENS] * k
            else:
                todo = [r for _, r in answer_requests(t, questions, cfg) if get(r.key) is None]
                stored += len(questions) - len(todo)
                prompts = [count(r.messages[-1]["content"]) for r in todo]
            requests += len(prompts)
            inputs += sum(prompts)
            expected_out += len(prompts) * out
            max_out += len(prompts) * tc.max_tokens
    finally:
        if store:
            store.close()
    price = tc.prices.get(tc.model) if tc.kind == "openai" else None
    usage = {"prompt_tokens": inputs, "completion_tokens": int(expected_out)}
    off = price_of(usage, price, False)
    peak = price_of(usage, price, True, when=_peak_time()) if price else None
    worst = price_of({"prompt_tokens": inputs, "completion_tokens": max_out}, price, True, when=_peak_time())
    return {"requests": requests, "already_answered": stored, "input_tokens": inputs, "tokens_counted_with": counted_with,
            "expected_output_tokens": int(expected_out), "max_output_tokens": max_out,
            "price_model": tc.model if price else f"{tc.model} (no price in teacher.prices)",
            "expected_cost_off_peak": off, "expected_cost_peak": peak, "max_cost_peak": worst,
            "max_cost_limit": tc.max_cost}


def _peak_time() -> float:
    import calendar

    return calendar.timegm((2026, 1, 5, 2, 0, 0))  # a Monday, 02:00 UTC: inside DeepSeek's peak window


def memory_estimate(cfg: Config) -> dict:
    """Expected peak GPU memory of one training process, in GiB, by part."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        mcfg = AutoConfig.from_pretrained(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:
        return {"note": f"student config not available ({type(err).__name__}); give a local folder for model_name"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    targets = cfg.lora.target_modules
    lora = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head and (
                targets == "all-linear" or name.split(".")[-1] in targets):
            lora += cfg.lora.r * (mod.in_features + mod.out_features)
    cuda_bf16 = cfg.train.precision in ("auto", "bf16")
    act_bytes = 2 if cfg.train.precision != "fp32" else 4
    if cfg.train.quantization == "4bit":
        head_params = head.weight.numel() if head is not None else 0
        weights = (n_params - head_params) * 0.53 + head_params * 2
    else:
        weights = n_params * (2 if cuda_bf16 or cfg.train.precision == "fp16" else 4)
    h = mcfg.hidden_size
    inter = getattr(mcfg, "intermediate_size", 4 * h)
    layers = mcfg.num_hidden_layers
    tokens = cfg.batch_size * cfg.max_length
    per_layer = tokens * (10 * h + 3 * inter) * act_bytes
    acts = layers * tokens * h * act_bytes + per_layer if cfg.gradient_checkpointing else layers * per_layer
    vocab = mcfg.vocab_size
    logits = (tokens // 2) * vocab * 4 * 3  # answer positions only: fp32 logits, log-softmax, gradient
    parts = {"weights": weights, "lora_adapter_grads_optimizer": lora * 16, "activations": acts,
             "logits": logits, "cuda_context_and_workspace": 0.75 * GiB}
    out = {k: round(v / GiB, 2) for k, v in parts.items()}
    out.update(total=round(sum(parts.values()) / GiB, 1), params=f"{n_params / 1e9:.2f}B",
               lora_params=f"{lora / 1e6:.1f}M", tokens_per_micro_batch=tokens)
    return out


def run_estimate(cfg: Config) -> dict:
    return {"teacher": teacher_estimate(cfg), "training_memory_gib": memory_estimate(cfg)}


def print_estimate(est: dict) -> None:
    for title, part in (("teacher requests and cost", est["teacher"]),
                        ("training memory per GPU (GiB, estimate)", est["training_memory_gib"])):
        table = Table(title=title, show_header=False, title_justify="left")
        for key, value in part.items():
            shown = f"{value:,.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
            table.add_row(key, shown)
        console.print(table)
