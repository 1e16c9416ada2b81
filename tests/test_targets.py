"""Where the teacher's distribution comes from: API logprobs across different tokenizers, and a local
white-box teacher; both end to end on CPU with tiny models."""

import numpy as np
from safetensors.numpy import load_file

from shifu.pipeline import run_all


def kd_folders(cfg):
    """The teacher-distribution folders under work_dir/kd (not the lock files beside them)."""
    return (p for p in sorted((cfg.work / "kd").iterdir()) if p.is_dir() and not p.name.startswith("."))


def lora_b_moved(output_dir) -> bool:
    """LoRA's B matrices start at zero: any non-zero B means gradients reached the adapter and it trained."""
    weights = load_file(f"{output_dir}/adapter_model.safetensors")
    b = [w for k, w in weights.items() if "lora_B" in k]
    return bool(b) and all(np.isfinite(w).all() for w in b) and any(np.abs(w).max() > 0 for w in b)


def test_cross_tokenizer_api_logprobs_align_partially_and_train(make_config, fake_server, other_tokenizer_model,
                                                                 tiny_student, tmp_path):
    # the teacher server tokenizes with a character-level vocabulary; the student is byte-level BPE
    from conftest import SAMPLE_EN

    server = fake_server(tokenizer=str(other_tokenizer_model))
    # English: both vocabularies hold many of the same whole words, so a good share aligns
    cfg = make_config(server.url, raw=SAMPLE_EN, teacher__top_logprobs=4, train__max_steps=3, distill__kd_ratio=0.5)
    res = run_all(cfg, until="train")
    cov = res["train"]["kd_coverage"]
    assert res["train"]["kd_source"] == "api" and 0.1 < cov < 1.0, cov
    assert np.isfinite(res["train"]["train_loss"]) and res["train"]["steps"] == 3 and lora_b_moved(cfg.output_dir)


def test_same_tokenizer_api_logprobs_cover_every_answer_token(make_config, fake_server, tiny_student):
    server = fake_server(tokenizer=str(tiny_student))
    cfg = make_config(server.url, teacher__top_logprobs=4, train__max_steps=2)
    res = run_all(cfg, until="train")
    from shifu.align import Targets

    folder = next(kd_folders(cfg))
    t = Targets(folder)
    # every answer token but the end-of-turn token (which the API never scores) has a distribution
    n_examples = len(t.index)
    assert t.coverage > 0.9 and (1 - t.coverage) * sum(n for _, n in t.index.values()) <= n_examples + 1e-6
    assert res["train"]["kd_coverage"] == round(t.coverage, 4)


def test_local_white_box_teacher_writes_top_k_once_and_reuses_it(make_config, fake_server, tiny_teacher):
    server = fake_server()
    cfg = make_config(server.url, distill__source="local", distill__local_teacher=str(tiny_teacher),
                      distill__local_top_k=6, train__max_steps=2)
    res = run_all(cfg, until="train")
    assert res["train"]["kd_source"] == "local" and res["train"]["kd_coverage"] == 1.0
    folders = list(kd_folders(cfg))
    stamp = (folders[0] / "ids.npy").stat().st_mtime_ns
    from shifu.pipeline import run_stage

    run_stage("train", cfg, force=True)
    assert list(kd_folders(cfg)) == folders and (folders[0] / "ids.npy").stat().st_mtime_ns == stamp


def test_local_teacher_with_another_tokenizer_is_refused(make_config, fake_server, other_tokenizer_model):
    import pytest

    from shifu.errors import UserError

    server = fake_server()
    cfg = make_config(server.url, distill__source="local", distill__local_teacher=str(other_tokenizer_model))
    run_all(cfg, until="dataset")
    from shifu.pipeline import run_stage

    with pytest.raises(UserError, match="different tokenizer"):
        run_stage("train", cfg)


def test_distillation_with_gradient_checkpointing_and_packing(make_config, fake_server, tiny_student):
    server = fake_server(tokenizer=str(tiny_student))
    for packing in (True, False):
        cfg = make_config(server.url, teacher__top_logprobs=4, train__max_steps=2, gradient_checkpointing=True,
                          train__packing=packing, distill__variant="jsd", distill__temperature=2.0)
        res = run_all(cfg, until="train")
        train = res["train"]
        assert train["packing"] is packing and np.isfinite(train["train_loss"]) and train["steps"] == 2
        # distillation from the teacher's logprobs, and gradients through the recomputed layers: a
        # checkpointed model whose inputs need no gradient would leave LoRA's B at zero
        assert train["kd_source"] == "api" and train["kd_coverage"] > 0.9
        assert lora_b_moved(cfg.output_dir), packing
