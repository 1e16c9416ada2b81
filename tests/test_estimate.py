"""`shifu estimate`'s training-memory side: weights counted as loading puts them, by dtype, for
real-shaped students built on the meta device from the configs shipped with shifu; the adapter
size is peft's own; it works offline and says at once when a hub name cannot be read."""

import json
import time

import pytest
import torch

from shifu.estimate import memory_estimate

# Published parameter counts: the shipped configs describe these models exactly.
SHIPPED = {"Qwen/Qwen2.5-7B-Instruct": 7_615_616_512, "Qwen/Qwen-7B-Chat": 7_721_324_544,
           "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768, "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304}


def test_lora_parameter_count_matches_peft(make_config, tiny_student):
    from peft import LoraConfig, get_peft_model

    from shifu.models import load_causal_lm

    cfg = make_config()
    est = memory_estimate(cfg)
    model = get_peft_model(load_causal_lm(str(tiny_student)),
                           LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est["lora_params"] == f"{trainable / 1e6:.1f}M"
    parts = ("weights", "lora_adapter_grads_optimizer", "activations", "output_head_and_loss",
             "cuda_context_and_workspace")
    assert est["total"] == pytest.approx(sum(est[p] for p in parts), abs=0.11)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weight_bytes_equal_what_training_loads(make_config, precision):
    """The estimate's bytes by dtype against the student load_student really loads (tiny, on CPU)."""
    from shifu.train import load_student

    cfg = make_config(train__precision=precision)
    est = memory_estimate(cfg)
    loaded: dict[str, int] = {}
    for name, p in load_student(cfg).named_parameters():
        if "lora_" not in name:
            key = str(p.dtype).replace("torch.", "")
            loaded[key] = loaded.get(key, 0) + p.numel() * p.element_size()
    assert est["weight_bytes_by_dtype"] == loaded and est["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]


@pytest.mark.parametrize("name", list(SHIPPED))
def test_real_shaped_students_on_the_meta_device(make_config, name):
    """Weights by dtype equal the parameters of the model built as loading builds it (bf16: 2 bytes a
    parameter, the published count), offline, from the config shipped with shifu."""
    from shifu.models import meta_causal_lm, student_config

    targets = ["c_attn", "c_proj", "w1", "w2"] if "Qwen-7B" in name else "all-linear"
    cfg = make_config(model_name=name, lora__target_modules=targets, batch_size=1, max_length=64)
    est = memory_estimate(cfg)
    model = meta_causal_lm(student_config(name), torch.bfloat16)
    params = {id(p): p for p in model.parameters()}.values()
    assert sum(p.numel() for p in params) == SHIPPED[name]
    assert est["weight_bytes_by_dtype"] == {"bfloat16": 2 * SHIPPED[name]}
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert est["config_from"] == "shipped with shifu (offline)"


def test_qlora_counts_linear_layers_in_nf4_and_the_rest_in_bf16(make_config):
    est = memory_estimate(make_config(model_name="Qwen/Qwen2.5-7B-Instruct", train__quantization="4bit",
                                      batch_size=1, max_length=64))
    embed_and_head = 2 * 152064 * 3584
    norms_and_biases = 28 * (2 * 3584 + 3584 + 2 * 512) + 3584
    assert est["weight_bytes_by_dtype"]["bfloat16"] == 2 * (embed_and_head + norms_and_biases)
    linear = 7_615_616_512 - embed_and_head - norms_and_biases
    assert est["weight_bytes_by_dtype"]["nf4"] == pytest.approx(linear * (0.5 + 1 / 64 + 8 / 64 / 256), rel=1e-6)


def test_checkpointing_and_4bit_shrink_the_estimate(make_config):
    full = memory_estimate(make_config(gradient_checkpointing=False, max_length=1024, batch_size=8))
    ckpt = memory_estimate(make_config(gradient_checkpointing=True, max_length=1024, batch_size=8))
    assert ckpt["activations"] < full["activations"]
    assert ckpt["activations_without_checkpointing"] == full["activations"]
    big = make_config(model_name="Qwen/Qwen2.5-0.5B-Instruct", max_length=256, batch_size=1)
    q4 = memory_estimate(big.model_copy(update={"train": big.train.model_copy(update={"quantization": "4bit"})}))
    assert q4["weights"] < memory_estimate(big)["weights"] / 2


def test_activations_grow_with_tokens(make_config):
    student = "Qwen/Qwen2.5-0.5B-Instruct"
    small = memory_estimate(make_config(model_name=student, max_length=512, batch_size=1, gradient_checkpointing=False))
    big = memory_estimate(make_config(model_name=student, max_length=512, batch_size=4, gradient_checkpointing=False))
    assert big["activations"] > 3 * small["activations"] > 0


@pytest.mark.parametrize("name", ["deepseek-qwen2.5-7b.yaml", "deepseek-qwen-7b-chat.yaml"])
def test_shipped_7b_configs_fit_one_24_gb_gpu(name):
    from conftest import ROOT

    from shifu.config import load_config

    est = memory_estimate(load_config(str(ROOT / "configs" / name)))
    assert est["params"].startswith("7.") and est["total"] <= 24e9 / 2**30 - 0.5  # 24 GB, with room to spare


def test_unavailable_student_is_one_line_within_a_second(make_config, tmp_path, monkeypatch):
    est = memory_estimate(make_config(model_name=str(tmp_path / "nowhere")))
    assert "note" in est and "folder not found" in est["note"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from shifu.models import hub_reachable

    hub_reachable.cache_clear()
    t0 = time.time()
    est = memory_estimate(make_config(model_name="SomeOrg/not-shipped-7B"))
    assert time.time() - t0 < 1.0
    assert "hub is unreachable" in est["note"] and "set model_name to DIR" in est["note"]
    assert "\n" not in est["note"]
    hub_reachable.cache_clear()


def test_a_hanging_network_counts_as_no_hub_within_a_second(monkeypatch):
    import socket

    from shifu.models import hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    def hang(*args, **kwargs):  # a DNS lookup that never answers, then fails as a real one would
        time.sleep(5)
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", hang)
    hub_reachable.cache_clear()
    t0 = time.time()
    assert hub_reachable() is False and time.time() - t0 < 1.5
    hub_reachable.cache_clear()


def test_estimate_json_on_the_command_line(make_config, tmp_path):
    from conftest import write_config
    from typer.testing import CliRunner

    from shifu.cli import app

    cfg = make_config(model_name="Qwen/Qwen2.5-0.5B-Instruct", data__max_chunks=2)
    result = CliRunner().invoke(app, ["estimate", str(write_config(cfg, tmp_path / "c.yaml")), "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    est = json.loads(result.stdout)
    assert est["training_memory_gib"]["params"] == "0.49B" and est["teacher"]["requests"] > 0


def test_a_model_whose_code_cannot_run_on_meta_is_measured_on_a_stand_in(make_config, monkeypatch):
    import shifu.estimate

    real, calls = shifu.estimate.layer_copy_facts, []

    def first_fails(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("flash_attn kernels need a GPU")
        return real(*args)

    monkeypatch.setattr(shifu.estimate, "layer_copy_facts", first_fails)
    est = memory_estimate(make_config(model_name="Qwen/Qwen2.5-0.5B-Instruct", max_length=256, batch_size=1))
    assert "qwen2 model of the same sizes" in est["activations_measured_on"] and est["activations"] > 0
