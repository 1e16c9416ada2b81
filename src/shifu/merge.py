"""Stage 6: merge the LoRA adapter into the student and save a model plain transformers loads.

    shifu merge configs/demo.yaml     # writes <output_dir>_merged

The base is loaded in the dtype its weights are stored in (bf16 for current Qwen models; on the
GPU where there is one, shifu.device's rule), so a 7B merge needs about the bf16 model's memory,
not fp32's. peft merges module by module in place: W += B @ A * scale, the product computed in
fp32. The merge is checked on a probe input: the merged model's logits must equal base + adapter
within the dtype's tolerance, else nothing is written. The result is saved as safetensors
(sharded above 5 GB) in the base model's dtype, with the tokenizer and a generation_config.json
whose end tokens are right for the template (Qwen: <|im_end|> and <|endoftext|>).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shifu.card import write_card
from shifu.config import Config, dump_config
from shifu.device import merge_placement
from shifu.errors import UserError
from shifu.files import atomic_dir
from shifu.models import end_token_ids, load_causal_lm, load_tokenizer

PROBE = "师父领进门，修行在个人。The master opens the door; the practice is yours."
# Largest allowed |merged - (base + adapter)| logit difference, relative to max(1, largest logit):
# rounding the merged weights to the dtype moves the logits by about this much, a missing or
# mis-scaled adapter by far more.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def stored_dtype(model_name: str) -> torch.dtype:
    """The dtype the base's weights are saved in (config.json), float32 if it does not say."""
    cfg_path = Path(model_name).expanduser() / "config.json"
    if cfg_path.exists():
        raw = json.loads(cfg_path.read_text())
        name = raw.get("dtype") or raw.get("torch_dtype")
        if name in ("bfloat16", "float16", "float32"):
            return getattr(torch, name)
    return torch.float32


def generation_config(model, tok):
    from transformers import GenerationConfig

    gen = model.generation_config if getattr(model, "generation_config", None) is not None else GenerationConfig()
    gen.eos_token_id = end_token_ids(tok)
    gen.pad_token_id = tok.pad_token_id
    return gen


def merge_checked(model, probe: dict, dtype: torch.dtype):
    """merge_and_unload, and the largest logit difference it made on the probe (raises if too large)."""
    with torch.no_grad():
        expected = model(**probe).logits.float()
        merged = model.merge_and_unload()
        got = merged(**probe).logits.float()
    diff = (expected - got).abs().max().item()
    if diff > TOLERANCE[dtype] * max(1.0, expected.abs().max().item()):
        raise UserError(f"merge check failed: merged logits differ from base + adapter by {diff:.3g} "
                        f"({str(dtype).replace('torch.', '')})")
    return merged, diff


def run_merge(cfg: Config) -> dict:
    from peft import PeftModel

    adapter = Path(cfg.output_dir)
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"{adapter}: no adapter_config.json; run `shifu train` first")
    tok = load_tokenizer(str(adapter), cfg.trust_remote_code)
    stored = stored_dtype(cfg.model_name)
    where = merge_placement(cfg.train.precision, stored)
    device_map = where.device_map if where.device.type == "cuda" else None
    base = load_causal_lm(cfg.model_name, cfg.trust_remote_code, where.dtype, device_map=device_map)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged, diff = merge_checked(model, tok(PROBE, return_tensors="pt").to(where.device), where.dtype)
    merged = merged.to(stored)
    with atomic_dir(cfg.merged_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tok.save_pretrained(tmp)
        generation_config(merged, tok).save_pretrained(tmp)
        (tmp / "shifu_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        write_card(cfg, tmp)  # README.md: the model card (shifu.card)
    files = sorted(p.name for p in cfg.merged_dir.iterdir())
    return {"merged_dir": str(cfg.merged_dir), "dtype": str(stored).replace("torch.", ""),
            "merged_in": str(where.dtype).replace("torch.", ""), "device": str(where.device),
            "max_logit_diff": diff, "files": files}
