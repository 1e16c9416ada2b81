"""shifu chat: the student's template and end tokens, streaming, base vs trained, one-shot and interactive."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import run_shifu, write_config

from shifu.chat import Speaker, answer, load_speakers, repl, resolve, run_chat
from shifu.errors import UserError
from shifu.models import end_token_ids, load_causal_lm, load_tokenizer

MESSAGES = [{"role": "user", "content": "孔乙己是谁？"}]


def plain_greedy(folder, messages, n=8, model=None) -> str:
    """The same answer without streaming: what the chat must print."""
    tok = load_tokenizer(str(folder))
    model = model or load_causal_lm(str(folder)).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=end_token_ids(tok),
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture()
def adapter_run(make_config, tiny_student):
    """A config whose output_dir holds a LoRA adapter with non-zero weights (so trained != base)."""
    from peft import LoraConfig, get_peft_model

    cfg = make_config()
    torch.manual_seed(3)
    model = get_peft_model(load_causal_lm(str(tiny_student)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 2.0)
    model.save_pretrained(cfg.output_dir)
    load_tokenizer(str(tiny_student)).save_pretrained(cfg.output_dir)
    return cfg


def test_one_shot_prints_the_same_answer_as_plain_generate(tiny_student, capsys):
    run_chat(str(tiny_student), prompt=MESSAGES[0]["content"], max_new_tokens=8)
    printed = capsys.readouterr().out
    assert printed == plain_greedy(tiny_student, MESSAGES) + "\n"


def test_stream_reply_writes_pieces_as_they_come(tiny_student):
    sp = load_speakers(resolve(str(tiny_student)), compare=False)[0]

    class Pieces(io.StringIO):
        writes = 0

        def write(self, s):
            self.writes += 1
            return super().write(s)

    out = Pieces()
    reply = answer([sp], MESSAGES[0]["content"], None, 12, 0.0, out)["trained"]
    assert out.getvalue() == reply + "\n" and out.writes >= 2


def test_compare_base_and_adapter_from_a_config(adapter_run, tiny_student, tmp_path):
    path = write_config(adapter_run, tmp_path / "run.yaml")
    t = resolve(str(path))
    assert t.adapter == adapter_run.output_dir and t.trained == str(tiny_student)
    speakers = load_speakers(t, compare=True)
    out = io.StringIO()
    replies = answer(speakers, MESSAGES[0]["content"], None, 8, 0.0, out)
    assert replies["base"] == plain_greedy(tiny_student, MESSAGES)  # adapter switched off for base
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_causal_lm(str(tiny_student)), adapter_run.output_dir).eval()
    assert replies["trained"] == plain_greedy(tiny_student, MESSAGES, model=merged)
    assert replies["base"] != replies["trained"]
    assert out.getvalue().startswith("[base] ") and "\n[trained] " in out.getvalue()


def test_merged_folder_is_preferred_and_its_base_comes_from_shifu_config(adapter_run, tiny_student):
    from shifu.merge import run_merge

    run_merge(adapter_run)
    t = resolve(str(adapter_run.merged_dir))
    assert t.trained == str(adapter_run.merged_dir) and t.adapter is None and t.base == str(tiny_student)


def test_repl_keeps_history_resets_and_exits(tiny_student):
    sp = load_speakers(resolve(str(tiny_student)), compare=False)[0]
    lines = iter(["你好", "再说一遍", "/reset", "", "/exit", "never read"])
    out = io.StringIO()
    repl([sp], None, 4, 0.0, read=lambda _: next(lines), out=out)
    assert sp.history == [] and next(lines) == "never read"
    sp2 = Speaker("trained", sp.model, sp.tok)
    lines2 = iter(["你好", "再说一遍"])

    def read(_):
        try:
            return next(lines2)
        except StopIteration:
            raise EOFError from None

    repl([sp2], None, 4, 0.0, read=read, out=io.StringIO())
    assert [m["role"] for m in sp2.history] == ["user", "assistant"] * 2


def test_no_trained_student_is_a_user_error(make_config, tmp_path):
    path = write_config(make_config(), tmp_path / "run.yaml")
    with pytest.raises(UserError, match="no trained student"):
        resolve(str(path))
    with pytest.raises(UserError, match="no config.json"):
        resolve(str(tmp_path))


def test_cli_one_shot(tiny_student):
    res = run_shifu("chat", tiny_student, "--prompt", "孔乙己是谁？", "--max-new-tokens", "6", timeout=400)
    assert res.returncode == 0, res.stderr
    assert res.stdout == plain_greedy(tiny_student, MESSAGES, n=6) + "\n"
