"""`shifu estimate`'s training-memory side: the parts add up and the adapter size is exact."""

import pytest

from shifu.estimate import memory_estimate


def test_lora_parameter_count_matches_peft(make_config, tiny_student):
    from peft import LoraConfig, get_peft_model

    from shifu.models import load_causal_lm

    cfg = make_config()
    est = memory_estimate(cfg)
    model = get_peft_model(load_causal_lm(str(tiny_student)),
                           LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est["lora_params"] == f"{trainable / 1e6:.1f}M"
    parts = ("weights", "lora_adapter_grads_optimizer", "activations", "logits", "cuda_context_and_workspace")
    assert est["total"] == pytest.approx(sum(est[p] for p in parts), abs=0.11)


def test_checkpointing_and_4bit_shrink_the_estimate(make_config):
    full = memory_estimate(make_config(gradient_checkpointing=False, max_length=1024, batch_size=8))
    ckpt = memory_estimate(make_config(gradient_checkpointing=True, max_length=1024, batch_size=8))
    q4 = memory_estimate(make_config(train__quantization="4bit"))
    bf16 = memory_estimate(make_config())
    assert ckpt["activations"] < full["activations"]
    assert q4["weights"] <= bf16["weights"]


def test_unavailable_student_config_is_said_not_raised(make_config, tmp_path):
    est = memory_estimate(make_config(model_name=str(tmp_path / "nowhere")))
    assert "note" in est
