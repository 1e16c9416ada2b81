"""Half precision exercised on CPU (torch runs bf16 there): a student stored in bf16 is trained with
bf16 base weights through the real run_train, merged in bf16 and evaluated; and the batched local
teacher gives the top-k of one example at a time."""

import json

import numpy as np
import pytest
import torch

from shifu.pipeline import run_all


@pytest.fixture(scope="module")
def bf16_student(tmp_path_factory, tiny_student):
    """The tiny student saved in bf16, as Qwen's weights are published."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("bf16_student")
    AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_student).save_pretrained(folder)
    return folder


def test_bf16_student_trains_merges_and_evaluates(make_config, fake_server, bf16_student, monkeypatch):
    from transformers import AutoModelForCausalLM

    import shifu.train

    loaded = []
    real_load = shifu.train.load_student
    monkeypatch.setattr(shifu.train, "load_student", lambda cfg: loaded.append(real_load(cfg)) or loaded[-1])
    server = fake_server()
    cfg = make_config(server.url, model_name=str(bf16_student), train__precision="bf16", train__max_steps=3,
                      learning_rate=5e-3, eval__max_examples=2)
    res = run_all(cfg)
    base = {p.dtype for n, p in loaded[0].named_parameters() if "lora_" not in n}
    adapters = {p.dtype for n, p in loaded[0].named_parameters() if "lora_" in n}
    assert base == {torch.bfloat16} and adapters == {torch.float32}  # half weights, fp32 adapters
    assert res["train"]["steps"] == 3 and np.isfinite(res["train"]["train_loss"])
    assert res["merge"]["dtype"] == "bfloat16" and res["merge"]["merged_in"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(cfg.merged_dir)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    report = json.loads((cfg.work / "eval" / "report.json").read_text())
    assert report  # the evaluation ran on the bf16 student


def test_batched_local_teacher_top_k_equals_one_at_a_time(tiny_teacher):
    from shifu.models import load_causal_lm
    from shifu.targets import length_batches, local_top_k

    teacher = load_causal_lm(str(tiny_teacher)).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, 700, n) for n in (9, 23, 14, 30)]
    starts = [4, 10, 7, 20]
    batched = local_top_k(teacher, seqs, starts, 5, torch.device("cpu"))
    for ids, start, (top_ids, top_lps) in zip(seqs, starts, batched):
        with torch.no_grad():
            logits = teacher(input_ids=torch.as_tensor(ids)[None]).logits[0, start - 1:len(ids) - 1]
        ref = torch.log_softmax(logits.float(), -1).topk(5, -1)
        assert top_lps.shape == (len(ids) - start, 5)
        assert np.allclose(top_lps, ref.values.numpy(), atol=1e-5)
        assert (top_ids == ref.indices.numpy()).mean() > 0.95  # near-ties may swap
    assert length_batches([30, 5, 12, 9], 30) == [[1, 3], [2], [0]]
