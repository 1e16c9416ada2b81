"""Training: packing without cross-attention, loss on answer tokens only, LoRA-only gradients,
distillation wiring, and the encoded examples."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shifu.encode import encode_examples, template_parts
from shifu.models import load_causal_lm, load_tokenizer
from shifu.train import DistillationTrainer, SFTDataset, collate, load_student, training_args, use_packing

EXAMPLES = [
    {"instruction": "孔乙己是谁？", "input": "", "output": "孔乙己是一个穿长衫的读书人。"},
    {"instruction": "Continue the passage.", "input": "Alice was beginning to get very tired", "output": "of sitting by her sister."},
    {"instruction": "他欠了多少钱？", "input": "掌柜取下粉板说，孔乙己还欠十九个钱呢！", "output": "十九个钱。"},
]


@pytest.fixture()
def tok(tiny_student):
    return load_tokenizer(str(tiny_student))


def test_encoding_labels_only_the_answer_and_its_end_token(tok):
    enc = encode_examples(tok, EXAMPLES, max_length=256)
    head, tail, end = template_parts(tok, None)
    assert tok.convert_ids_to_tokens(end) == ["<|im_end|>"]
    for ex, ids, start in zip(EXAMPLES, enc.input_ids, enc.answer_start):
        assert tok.decode(ids[start:]) == ex["output"] + "<|im_end|>"
        prompt = tok.decode(ids[:start])
        assert prompt.endswith("<|im_start|>assistant\n") and ex["instruction"] in prompt


def test_truncation_cuts_the_middle_of_the_prompt_and_keeps_the_answer(tok):
    long = {"instruction": "请回答：" + "长" * 400, "input": "问题在最后？", "output": "答案。"}
    enc = encode_examples(tok, [long], max_length=100)
    ids, start = enc.input_ids[0], enc.answer_start[0]
    assert len(ids) <= 100 and enc.truncated == 1
    assert tok.decode(ids[start:]) == "答案。<|im_end|>"
    assert "请回答" in tok.decode(ids[:start]) and "问题在最后" in tok.decode(ids[:start])


def _batch(tok, packing, targets=None):
    enc = encode_examples(tok, EXAMPLES, max_length=256)
    ds = SFTDataset(enc, targets)
    return collate([ds[i] for i in range(len(ds))], packing, tok.pad_token_id), enc


def test_packed_examples_do_not_attend_to_each_other(tiny_student, tok):
    model = load_causal_lm(str(tiny_student)).eval()
    packed, enc = _batch(tok, True)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        offset = 0
        for ids in enc.input_ids:
            alone = model(input_ids=torch.as_tensor(ids[None], dtype=torch.long), use_cache=False).logits[0]
            assert torch.allclose(together[offset:offset + len(ids)], alone, atol=1e-5)
            offset += len(ids)
        # changing the first example must not move the logits of the others
        changed = packed["input_ids"].clone()
        changed[0, 2:len(enc.input_ids[0])] = 5
        moved = model(input_ids=changed, position_ids=packed["position_ids"], use_cache=False).logits[0]
        n0 = len(enc.input_ids[0])
        assert torch.allclose(moved[n0:], together[n0:], atol=1e-5)
        assert not torch.allclose(moved[:n0], together[:n0], atol=1e-3)


def _trainer(cfg, tmp_path, dataset):
    model = load_student(cfg)
    packing = use_packing(cfg, model)
    args = training_args(cfg, has_eval=False, packing=packing)
    return DistillationTrainer(model=model, args=args, train_dataset=dataset, distill=cfg.distill,
                               data_collator=lambda items: collate(items, packing, 0))


def manual_answer_ce(model, enc):
    """Reference: full logits, CE on answer positions only, averaged over answer tokens."""
    total, n = 0.0, 0
    for ids, start in zip(enc.input_ids, enc.answer_start):
        x = torch.as_tensor(ids[None], dtype=torch.long)
        logits = model(input_ids=x).logits[0]
        total += F.cross_entropy(logits[start - 1:-1], x[0, start:], reduction="sum").item()
        n += len(ids) - start
    return total / n, n


@pytest.mark.parametrize("packing", [True, False])
def test_loss_is_the_mean_ce_over_answer_tokens(make_config, tmp_path, tok, packing):
    cfg = make_config(train__packing=packing)
    enc = encode_examples(tok, EXAMPLES, max_length=256)
    trainer = _trainer(cfg, tmp_path, SFTDataset(enc))
    batch = collate([SFTDataset(enc)[i] for i in range(3)], packing, tok.pad_token_id)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        want, n = manual_answer_ce(trainer.model, enc)
    assert loss == pytest.approx(want, rel=1e-4)
    assert int((batch["labels"][:, 1:] != -100).sum()) == n  # prompt tokens never count


def test_gradients_reach_only_lora_and_base_weights_stay(make_config, tmp_path, tok):
    cfg = make_config()
    enc = encode_examples(tok, EXAMPLES, max_length=256)
    trainer = _trainer(cfg, tmp_path, SFTDataset(enc))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = collate([SFTDataset(enc)[i] for i in range(3)], True, tok.pad_token_id)
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    with_grad = [n for n, p in trainer.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    trainer.train()
    after = trainer.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("lora_" in k for k in changed)


class FixedTargets:
    """Teacher rows = the student's own top-k, so the distillation term starts near zero."""

    def __init__(self, rows, width):
        self.rows, self.width = rows, width

    def get(self, i):
        return self.rows.get(i)


def test_distillation_term_is_wired_and_scaled(make_config, tmp_path, tok, tiny_student):
    enc = encode_examples(tok, EXAMPLES, max_length=256)
    model = load_causal_lm(str(tiny_student)).eval()
    rows, k = {}, 8
    with torch.no_grad():
        for i, (ids, start) in enumerate(zip(enc.input_ids, enc.answer_start)):
            logp = model(input_ids=torch.as_tensor(ids[None], dtype=torch.long)).logits[0, start - 1:-1].log_softmax(-1)
            top = logp.topk(k)
            rows[i] = (top.indices.numpy().astype(np.int32), top.values.numpy())
    for ratio in (0.0, 1.0):
        cfg = make_config(distill__kd_ratio=ratio, train__packing=True)
        trainer = _trainer(cfg, tmp_path, SFTDataset(enc))
        batch = collate([SFTDataset(enc, FixedTargets(rows, k))[i] for i in range(3)], True, tok.pad_token_id)
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        ce, _ = manual_answer_ce(trainer.model, enc)
        if ratio == 0.0:
            assert loss == pytest.approx(ce, rel=1e-4)
        else:  # every answer token but the end token has a teacher row equal to the student: KD ~ 0
            n_end = len(EXAMPLES)
            n = sum(len(x) - s for x, s in zip(enc.input_ids, enc.answer_start))
            assert loss < ce * (n_end + 1) / n


def test_qlora_on_cpu_is_a_clear_error(make_config):
    from shifu.errors import UserError

    with pytest.raises(UserError, match="CUDA"):
        load_student(make_config(train__quantization="4bit"))
