"""Stage 6: merge the LoRA adapter into the student and save a model plain transformers loads.

    shifu merge configs/demo.yaml     # writes <output_dir>_merged

The merge runs in float32 and is checked on a probe input: the merged model's logits must equal
base + adapter within float tolerance, else nothing is written. The result is saved as
safetensors (sharded above 5 GB) in the base model's dtype, with the tokenizer and a
generation_config.json whose end tokens are right for the template (Qwen: <|im_end|> and
<|endoftext|>).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shifu.config import Config, dump_config
from shifu.errors import UserError
from shifu.files import atomic_dir
from shifu.models import end_token_ids, load_causal_lm, load_tokenizer

PROBE = "师父领进门，修行在个人。The master opens the door; the practice is yours."


def base_dtype(model_name: str, model) -> torch.dtype:
    cfg_path = Path(model_name) / "config.json"
    if cfg_path.exists():
        raw = json.loads(cfg_path.read_text())
        name = raw.get("dtype") or raw.get("torch_dtype")
        if name in ("bfloat16", "float16", "float32"):
            return getattr(torch, name)
    return getattr(model.config, "dtype", None) or torch.float32


def generation_config(model, tok):
    from transformers import GenerationConfig

    gen = model.generation_config if getattr(model, "generation_config", None) is not None else GenerationConfig()
    gen.eos_token_id = end_token_ids(tok)
    gen.pad_token_id = tok.pad_token_id
    return gen


def run_merge(cfg: Config) -> dict:
    from peft import PeftModel

    adapter = Path(cfg.output_dir)
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"{adapter}: no adapter_config.json; run `shifu train` first")
    tok = load_tokenizer(str(adapter), cfg.trust_remote_code)
    base = load_causal_lm(cfg.model_name, cfg.trust_remote_code, torch.float32)
    dtype = base_dtype(cfg.model_name, base)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    probe = tok(PROBE, return_tensors="pt")
    with torch.no_grad():
        expected = model(**probe).logits
        merged = model.merge_and_unload()
        got = merged(**probe).logits
    diff = (expected - got).abs().max().item()
    if diff > 1e-3 * max(1.0, expected.abs().max().item()):
        raise UserError(f"merge check failed: merged logits differ from base + adapter by {diff:.3g}")
    merged = merged.to(dtype)
    with atomic_dir(cfg.merged_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tok.save_pretrained(tmp)
        generation_config(merged, tok).save_pretrained(tmp)
        (tmp / "shifu_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    files = sorted(p.name for p in cfg.merged_dir.iterdir())
    return {"merged_dir": str(cfg.merged_dir), "dtype": str(dtype).replace("torch.", ""),
            "max_logit_diff": diff, "files": files}
