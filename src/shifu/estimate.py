"""`shifu estimate`: what a run will cost before anything is spent.

    shifu estimate configs/deepseek-qwen2.5-7b.yaml

Teacher: runs the offline chunk and tasks stages, then counts requests, input tokens (with the
student's tokenizer when it loads locally, else a stated heuristic), expected and maximum output
tokens, and the price from `teacher.prices` at off-peak and peak rates, treating every input
token as a cache miss (the upper bound). Requests whose answers are already stored are left out,
so the estimate of a resumed run is what is left to pay.
Training: expected GPU memory for the configured student, LoRA, batch and max_length, broken
down into weights (by dtype), adapter with its gradients and optimizer state, activations (with
and without gradient checkpointing) and the output head. The student is built on the meta device
from its config in the dtype training loads (shifu.device), so no weights are read; the configs
of the shipped configs' students come with shifu (shifu/model_configs/), so this works offline.
`shifu estimate CONFIG --json` prints the same as one JSON object.
"""

from __future__ import annotations

import math

from rich.table import Table

from shifu.config import Config
from shifu.files import read_jsonl
from shifu.limits import price_of
from shifu.progress import console
from shifu.tasks import format_prompt
from shifu.teacher import estimate_tokens

GiB = 1024 ** 3
QUESTION_TOKENS = 40  # a proposed question, as observed with DeepSeek and Qwen teachers


def _counter(cfg: Config):
    from shifu.models import hub_reachable, is_local, load_tokenizer

    if not is_local(cfg.model_name) and not hub_reachable():  # the hub client would retry for a minute
        return estimate_tokens, "heuristic (no hub, no local student folder): 1 token per CJK character, 4 other characters per token"
    try:
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
    tasks = [t for t in read_jsonl(cfg.tasks_path) if t["source"] == "teacher"]
    count, counted_with = _counter(cfg)
    tc, k = cfg.teacher, cfg.tasks.qa_per_chunk
    store = Store(cfg.store_path) if cfg.store_path.exists() else None
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
            if cfg.tasks.follow_ups and cfg.tasks.qa_mode != "closed":
                # per answer, a follow-up question then its answer, each with the first exchange in the
                # prompt (counted in full even where a resumed run stored some of them)
                requests += 2 * len(prompts)
                inputs += sum(2 * (p + int(out)) + QUESTION_TOKENS for p in prompts)
                expected_out += len(prompts) * (QUESTION_TOKENS + out)
                max_out += 2 * len(prompts) * tc.max_tokens
    finally:
        if store:
            store.close()
    # A thinking teacher reasons before every answer (proposals too), billed as output.
    reasoning = requests * tc.expected_reasoning_tokens if tc.thinking else 0
    expected_out += reasoning
    price = tc.prices.get(tc.model) if tc.kind == "openai" else None
    usage = {"prompt_tokens": inputs, "completion_tokens": int(expected_out)}
    off = price_of(usage, price, False)
    peak = price_of(usage, price, True, when=_peak_time()) if price else None
    worst = price_of({"prompt_tokens": inputs, "completion_tokens": max_out}, price, True, when=_peak_time())
    return {"requests": requests, "already_answered": stored, "input_tokens": inputs, "tokens_counted_with": counted_with,
            "expected_output_tokens": int(expected_out), "expected_reasoning_tokens": reasoning,
            "max_output_tokens": max_out,
            "price_model": tc.model if price else f"{tc.model} (no price in teacher.prices)",
            "expected_cost_off_peak": off, "expected_cost_peak": peak, "max_cost_peak": worst,
            "max_cost_limit": tc.max_cost}


def _peak_time() -> float:
    import calendar

    return calendar.timegm((2026, 1, 5, 2, 0, 0))  # a Monday, 02:00 UTC: inside DeepSeek's peak window


def training_dtype(cfg: Config):
    """The dtype training will load the base in (shifu.device's rule), for the GPU it will run on:
    this one if it has one, else a bf16-capable GPU."""
    import torch

    from shifu.device import choose_dtype

    bf16_ok = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
    return choose_dtype(cfg.train.precision, True, bf16_ok)


def nf4_bytes(numel: int) -> float:
    """bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit scale per 64 weights,
    an fp32 scale (and offset) per 256 of those."""
    return numel / 2 + numel / 64 + numel / (64 * 256) * 8


def weight_bytes(model, quantized: bool) -> dict[str, float]:
    """Bytes of the base weights by dtype, as loading puts them: with 4-bit, every linear layer but the
    output head in NF4 (as transformers' bitsandbytes integration converts them), the rest as loaded."""
    import torch

    head = model.get_output_embeddings()
    nf4 = {id(m.weight) for m in model.modules()
           if quantized and isinstance(m, torch.nn.Linear) and m is not head}
    out: dict[str, float] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key, size = ("nf4", nf4_bytes(p.numel())) if id(p) in nf4 else (str(p.dtype).replace("torch.", ""),
                                                                         p.numel() * p.element_size())
        out[key] = out.get(key, 0) + size
    return out


def lora_targets(mcfg, targets):
    """target_modules in the names of the model built here (a shipped layout may rename them)."""
    names = getattr(mcfg, "shifu_module_names", None) or {}
    if targets == "all-linear" or not names:
        return targets
    return sorted({n for t in targets for n in names.get(t, [t])})


def _flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What a GPU's fused attention saves for backward (q, k, v, output, log-sum-exp), on the meta
    device, where PyTorch's sdpa would fall back to its math kernel and save the whole score matrix."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), 0.0, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def layer_copy_facts(mcfg, dtype, layers: int, lora, batch: int, length: int) -> tuple[int, int]:
    """(activation bytes, LoRA parameters) of a `layers`-layer copy of the model.

    Activation bytes: what autograd keeps for the backward pass of that copy with its LoRA adapters,
    measured on the meta device: the real code path (peft's fp32 casts, dropout masks, RMSNorm's
    upcasts) with no memory and no compute. Frozen weights saved for backward are not counted."""
    import copy

    import torch
    from peft import get_peft_model
    from transformers import AttentionInterface

    from shifu.models import meta_causal_lm

    AttentionInterface.register("shifu_meta_fused", _flash_like_attention)
    small = copy.deepcopy(mcfg)
    small.num_hidden_layers = layers
    if hasattr(small, "layer_types") and small.layer_types:
        small.layer_types = small.layer_types[:layers]
    small._attn_implementation = "shifu_meta_fused"
    model = get_peft_model(meta_causal_lm(small, dtype), copy.deepcopy(lora))
    model.train()
    params = {id(p) for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        base = t
        while base._base is not None:
            base = base._base
        if id(base) not in params:
            kept[id(base)] = max(kept.get(id(base), 0), t.numel() * t.element_size())
        return t

    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, logits_to_keep=1, use_cache=False)
    return sum(kept.values()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def memory_estimate(cfg: Config) -> dict:
    """Expected peak GPU memory of one training process, in GiB, by part.

    Weights: the student built on the meta device from its config in the dtype training loads
    (shifu.device's rule), the same shapes and dtypes as `load_student`, counted by dtype.
    Adapter: peft's own LoRA layers on a 1- and a 2-layer copy of that model, scaled to all layers:
    fp32 weights, gradients and AdamW's two moments.
    Activations: what autograd saves, measured on a 1- and a 2-layer copy (the difference is one
    layer), for batch_size rows of max_length tokens; with gradient checkpointing each layer keeps
    only its input, and one layer at a time is recomputed. Output head: one chunk of answer positions
    (shifu.losses.LOGIT_CHUNK) of full-vocabulary logits, in fp32, with its log-softmax and gradient."""
    from peft import LoraConfig

    from shifu.errors import UserError
    from shifu.losses import LOGIT_CHUNK
    from shifu.models import meta_causal_lm, student_config

    try:
        mcfg = student_config(cfg.model_name, cfg.trust_remote_code)
    except UserError as err:
        return {"note": str(err)}
    dtype = training_dtype(cfg)
    quantized = cfg.train.quantization == "4bit"
    try:
        model = meta_causal_lm(mcfg, dtype, cfg.trust_remote_code)
    except Exception as err:  # a model's own code that cannot run on the meta device
        return {"note": f"model {cfg.model_name!r}: cannot be built on the meta device "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"}
    by_dtype = weight_bytes(model, quantized)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=lora_targets(mcfg, cfg.lora.target_modules), task_type="CAUSAL_LM")
    b, n = cfg.batch_size, cfg.max_length
    layers, width = mcfg.num_hidden_layers, mcfg.hidden_size
    # peft on a whole 7B meta model takes seconds; a 1- and a 2-layer copy tell the same exactly
    try:
        one, lora_one = layer_copy_facts(mcfg, dtype, 1, lora, b, n)
        two, lora_two = layer_copy_facts(mcfg, dtype, 2, lora, b, n)
        measured_on = None
    except Exception:  # a model's own attention code (trust_remote_code) that the meta device cannot run
        stand_in, measured_on = qwen2_stand_in(mcfg), "a qwen2 model of the same sizes, all linear layers adapted"
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        one, lora_one = layer_copy_facts(stand_in, dtype, 1, lora, b, n)
        two, lora_two = layer_copy_facts(stand_in, dtype, 2, lora, b, n)
    per_layer, outside = two - one, 2 * one - two  # outside the layers: embeddings, final norm
    lora_params = lora_one + (layers - 1) * (lora_two - lora_one)
    size = dtype.itemsize
    full = layers * per_layer + outside
    ckpt = layers * b * n * width * size + per_layer + outside
    # backward: gradients of one layer's activations exist alongside its saved ones
    acts = (ckpt if cfg.gradient_checkpointing else full) + per_layer
    chunk = min(LOGIT_CHUNK, b * n)
    head = chunk * mcfg.vocab_size * (size + 4 * 3) + b * n * width * size
    parts = {"weights": sum(by_dtype.values()), "lora_adapter_grads_optimizer": lora_params * 16,
             "activations": acts, "output_head_and_loss": head, "cuda_context_and_workspace": 0.75 * GiB}
    out = {k: round(v / GiB, 2) for k, v in parts.items()}
    out.update(total=round(sum(parts.values()) / GiB, 1), dtype=str(dtype).replace("torch.", ""),
               weights_gib_by_dtype={k: round(v / GiB, 2) for k, v in by_dtype.items()},
               weight_bytes_by_dtype={k: int(v) for k, v in by_dtype.items()},
               activations_with_checkpointing=round((ckpt + per_layer) / GiB, 2),
               activations_without_checkpointing=round((full + per_layer) / GiB, 2),
               params=f"{n_params / 1e9:.2f}B", lora_params=f"{lora_params / 1e6:.1f}M",
               tokens_per_micro_batch=b * n)
    if getattr(mcfg, "shifu_module_names", None) is not None:
        out["config_from"] = "shipped with shifu (offline)"
    if measured_on:
        out["activations_measured_on"] = measured_on
    return out


def qwen2_stand_in(mcfg):
    """A built-in architecture with the model's sizes, for models whose own code is not measurable."""
    from transformers import Qwen2Config

    width = mcfg.hidden_size
    heads = getattr(mcfg, "num_attention_heads", None) or width // 128
    return Qwen2Config(hidden_size=width, intermediate_size=getattr(mcfg, "intermediate_size", 4 * width),
                       num_hidden_layers=mcfg.num_hidden_layers, num_attention_heads=heads,
                       num_key_value_heads=getattr(mcfg, "num_key_value_heads", heads), vocab_size=mcfg.vocab_size)


def run_estimate(cfg: Config) -> dict:
    from shifu.eval_plan import eval_estimate

    return {"teacher": teacher_estimate(cfg), "training_memory_gib": memory_estimate(cfg),
            "evaluation": eval_estimate(cfg)}


def print_estimate(est: dict) -> None:
    for title, part in (("teacher requests and cost", est["teacher"]),
                        ("training memory per GPU (GiB, estimate)", est["training_memory_gib"]),
                        ("evaluation: judge requests and cost, student time (estimate)", est["evaluation"])):
        table = Table(title=title, show_header=False, title_justify="left")
        for key, value in part.items():
            shown = f"{value:,.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
            table.add_row(key, shown)
        console.print(table)


def print_estimate_json(est: dict) -> None:
    import json
    import sys

    sys.stdout.write(json.dumps(est, ensure_ascii=False, indent=1, default=str) + "\n")
