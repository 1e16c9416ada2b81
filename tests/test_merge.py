"""The merged model: plain transformers loads it, its logits equal base + adapter, it ends turns right."""

import json

import pytest
import torch

from shifu.merge import run_merge
from shifu.pipeline import run_all


@pytest.fixture()
def trained(make_config, fake_server):
    server = fake_server()
    cfg = make_config(server.url, train__max_steps=3, learning_rate=5e-3)
    run_all(cfg, until="train")
    return cfg


def test_merged_model_loads_with_plain_transformers_and_matches_base_plus_adapter(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats = run_merge(trained)
    merged_dir = trained.merged_dir
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "shifu_config.yaml"):
        assert (merged_dir / name).exists(), name
    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(trained.model_name).eval()
    x = tok("孔乙己是站着喝酒而穿长衫的唯一的人。", return_tensors="pt")
    with torch.no_grad():
        plain = base(**x).logits
        with_adapter = PeftModel.from_pretrained(base, trained.output_dir).eval()(**x).logits
        got = merged(**x).logits
    assert torch.allclose(got, with_adapter, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)  # the adapter did change the model
    assert stats["max_logit_diff"] < 1e-4
    out = merged.generate(**x, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > x["input_ids"].shape[1]


def test_generation_config_ends_on_both_qwen_end_tokens(trained):
    run_merge(trained)
    gen = json.loads((trained.merged_dir / "generation_config.json").read_text())
    vocab = json.loads((trained.merged_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert set(gen["eos_token_id"]) == {ids["<|im_end|>"], ids["<|endoftext|>"]}
    assert "api_key" not in (trained.merged_dir / "shifu_config.yaml").read_text().replace("api_key_env", "")


def test_merge_without_adapter_is_a_clear_error(make_config):
    from shifu.errors import UserError

    with pytest.raises(UserError, match="run `shifu train` first"):
        run_merge(make_config())
