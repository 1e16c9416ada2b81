"""shifu.device's one rule, and every stage that loads a model following it, with CUDA and bf16
support faked: the stage is stopped at the load and the dtype and device it asked for are checked."""

import asyncio

import pytest
import torch

from shifu.device import choose_dtype, merge_placement, placement
from shifu.errors import UserError

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("precision,cuda,bf16_ok,want", [
    ("auto", True, True, BF16), ("auto", True, False, FP16), ("auto", False, False, FP32),
    ("fp32", True, True, FP32), ("bf16", False, False, BF16), ("bf16", True, True, BF16),
    ("fp16", True, False, FP16)])
def test_the_rule(precision, cuda, bf16_ok, want):
    assert choose_dtype(precision, cuda, bf16_ok) == want


@pytest.mark.parametrize("precision,cuda,bf16_ok", [("bf16", True, False), ("fp16", False, False), ("half", True, True)])
def test_impossible_choices_are_user_errors(precision, cuda, bf16_ok):
    with pytest.raises(UserError, match="train.precision"):
        choose_dtype(precision, cuda, bf16_ok)


@pytest.fixture()
def gpu(monkeypatch):
    """Two fake GPUs; `gpu(bf16=False)` makes them pre-Ampere."""
    def fake(bf16: bool = True, rank: str = "1"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setenv("LOCAL_RANK", rank)
    return fake


def test_each_process_takes_its_local_rank_gpu(gpu):
    gpu(rank="1")
    assert placement("auto") == placement("bf16")
    where = placement("auto")
    assert where.device == torch.device("cuda", 1) and where.dtype == BF16
    assert where.trainer_flags == {"bf16": True, "fp16": False}
    gpu(bf16=False, rank="3")  # more ranks than GPUs on this node: wraps around
    where = placement("auto")
    assert where.device == torch.device("cuda", 1) and where.dtype == FP16
    assert where.trainer_flags == {"bf16": False, "fp16": True}


def test_cpu_is_fp32_unless_bf16_is_asked_for():
    assert placement("auto").device.type == "cpu" and placement("auto").dtype == FP32
    assert placement("bf16").trainer_flags == {"bf16": True, "fp16": False}


def test_merge_keeps_a_stored_half_dtype_even_on_cpu(gpu):
    assert merge_placement("auto", BF16).dtype == BF16  # not fp32: that would double the merge's RAM
    assert merge_placement("auto", FP32).dtype == FP32
    assert merge_placement("fp32", BF16).dtype == FP32
    assert merge_placement("auto", FP16).dtype == FP32  # fp16 matmuls on CPU: merged in fp32
    gpu()
    assert merge_placement("auto", FP16) == placement("auto").__class__(torch.device("cuda", 1), FP16)


class Loaded(Exception):
    pass


@pytest.fixture()
def loads(monkeypatch):
    """Replaces load_causal_lm wherever a stage imports it; records what was asked for, then stops."""
    calls = []

    def fake(name, trust_remote_code=False, dtype=None, quantization_config=None, device_map=None):
        calls.append({"dtype": dtype, "device_map": device_map, "quant": quantization_config})
        raise Loaded
    import shifu.merge
    import shifu.models
    import shifu.train
    for module in (shifu.models, shifu.train, shifu.merge):
        monkeypatch.setattr(module, "load_causal_lm", fake)
    return calls


@pytest.mark.parametrize("bf16_ok,want", [(True, BF16), (False, FP16)])
def test_training_loads_half_weights_on_a_gpu(gpu, loads, make_config, bf16_ok, want):
    from shifu.train import load_student, precision

    gpu(bf16=bf16_ok)
    cfg = make_config()
    with pytest.raises(Loaded):
        load_student(cfg)
    assert loads[-1]["dtype"] == want and loads[-1]["device_map"] is None  # the Trainer moves it to its GPU
    assert precision(cfg) == {"bf16": want == BF16, "fp16": want == FP16}


def test_qlora_loads_nf4_onto_its_own_gpu(gpu, loads, make_config):
    pytest.importorskip("bitsandbytes", reason="BitsAndBytesConfig checks for bitsandbytes")
    from shifu.train import load_student

    gpu()
    with pytest.raises(Loaded):
        load_student(make_config(train__quantization="4bit"))
    assert loads[-1]["dtype"] == BF16 and loads[-1]["device_map"] == {"": torch.device("cuda", 1)}
    assert loads[-1]["quant"].bnb_4bit_compute_dtype == BF16


def test_training_on_cpu(loads, make_config):
    from shifu.train import load_student

    for precision, want in (("auto", FP32), ("bf16", BF16)):
        with pytest.raises(Loaded):
            load_student(make_config(train__precision=precision))
        assert loads[-1]["dtype"] == want
    with pytest.raises(UserError, match="4bit"):
        load_student(make_config(train__quantization="4bit"))


def test_merge_loads_the_base_in_its_half_dtype(gpu, loads, make_config, tmp_path, monkeypatch):
    import shifu.merge

    cfg = make_config()
    adapter = tmp_path / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(shifu.merge, "load_tokenizer", lambda *a, **k: None)
    monkeypatch.setattr(shifu.merge, "stored_dtype", lambda name: BF16)
    with pytest.raises(Loaded):
        shifu.merge.run_merge(cfg)
    assert loads[-1]["dtype"] == BF16 and loads[-1]["device_map"] is None  # CPU: RAM of the bf16 model
    gpu()
    with pytest.raises(Loaded):
        shifu.merge.run_merge(cfg)
    assert loads[-1]["dtype"] == BF16 and loads[-1]["device_map"] == {"": torch.device("cuda", 1)}


def test_local_teacher_and_local_targets_follow_the_rule(gpu, loads, make_config, tiny_teacher, tiny_student):
    from shifu.config import TeacherConfig
    from shifu.models import load_tokenizer
    from shifu.targets import _build_from_local
    from shifu.teacher import LocalClient

    async def enter():
        async with LocalClient(TeacherConfig(kind="local", model=str(tiny_teacher))):
            pass

    cfg = make_config(distill__source="local", distill__local_teacher=str(tiny_teacher))
    tok = load_tokenizer(str(tiny_student))
    for fake_gpu, want, device_map in ((False, FP32, None), (True, BF16, {"": torch.device("cuda", 1)})):
        if fake_gpu:
            gpu()
        with pytest.raises(Loaded):
            asyncio.run(enter())
        assert loads[-1]["dtype"] == want and loads[-1]["device_map"] == device_map
        with pytest.raises(Loaded):
            _build_from_local(cfg, tok, None, None)
        assert loads[-1]["dtype"] == want and loads[-1]["device_map"] == device_map


def test_estimate_plans_for_the_dtype_training_will_load(make_config):
    from shifu.estimate import training_dtype

    assert training_dtype(make_config()) == BF16  # auto: a bf16 GPU, wherever the estimate runs
    assert training_dtype(make_config(train__precision="fp32")) == FP32
    assert training_dtype(make_config(train__precision="fp16")) == FP16
