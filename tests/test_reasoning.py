"""Reasoning distillation (issue 16): a thinking teacher's reasoning read under both field names,
stored (also in a store made before the column existed), checked and priced; the export formats
other tools train on; reasoning students' labels.

    .venv/bin/python -m pytest -q tests/test_reasoning.py
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from shifu.config import Price
from shifu.files import read_jsonl
from shifu.limits import price_of
from shifu.pipeline import run_stage
from shifu.store import Store
from shifu.teacher import Answer, Request, answer_flags, make_client

PRICES = {"fake-teacher": {"input_cache_hit": 1.0, "input_cache_miss": 2.0, "output": 4.0}}


def teach(cfg) -> dict:
    for name in ("chunk", "tasks", "teach"):
        stats = run_stage(name, cfg)
    return stats


def ask(cfg, prompt: str = "什么是蒸馏？请回答。") -> Answer:
    async def go():
        async with make_client(cfg.teacher) as client:
            return await client.complete(Request.build(cfg.teacher, prompt))
    return asyncio.run(go())


# ---- thinking teachers --------------------------------------------------------------------------

def test_thinking_turns_deepseeks_switch_on_and_off_by_default(make_config):
    off = Request.build(make_config().teacher, "hi")
    on = Request.build(make_config(teacher__thinking=True).teacher, "hi")
    assert off.params["thinking"] == {"type": "disabled"} and on.params["thinking"] == {"type": "enabled"}
    assert on.key != off.key  # a thinking answer is another purchase, never mistaken for a plain one
    vllm = make_config(teacher__thinking=True, teacher__extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert Request.build(vllm.teacher, "hi").params["chat_template_kwargs"] == {"enable_thinking": True}


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_is_read_under_both_field_names_and_priced_as_output(fake_server, make_config, field):
    server = fake_server(reasoning_field=field)
    cfg = make_config(server.url, teacher__thinking=True, teacher__prices=PRICES)
    ans = ask(cfg)
    assert ans.reasoning.startswith("Let me think.") and ans.content.strip() and ans.flags == []
    assert 0 < ans.usage["reasoning_tokens"] < ans.usage["completion_tokens"]
    price = Price(**PRICES["fake-teacher"])
    u = ans.usage
    expected = (u["prompt_cache_hit_tokens"] * 1.0 + u["prompt_cache_miss_tokens"] * 2.0
                + u["completion_tokens"] * 4.0) / 1e6
    assert price_of(u, price, False) == pytest.approx(expected)
    # A server that counts reasoning apart from completion_tokens: both are billed as output.
    apart = {"prompt_tokens": 0, "completion_tokens": 10, "reasoning_tokens": 30}
    assert price_of(apart, price, False) == pytest.approx(40 * 4.0 / 1e6)


def test_reasoning_checks_flag_cut_off_empty_and_answerless_thoughts():
    assert answer_flags("", "length", reasoning="Let me thi") == ["truncated_reasoning"]
    assert answer_flags("", "stop", reasoning="I thought and thought.") == ["no_answer"]
    assert answer_flags("答案。", "stop", reasoning="") == ["empty_reasoning"]
    assert answer_flags("答案。", "stop", reasoning="先想一想。") == []
    assert answer_flags("答案。", "stop") == []  # not a thinking teacher: no reasoning expected


def test_a_thinking_answer_cut_off_mid_reasoning_is_flagged(fake_server, make_config):
    server = fake_server(reasoning_field="reasoning_content", fault_rate=1.0, faults=["cut_reasoning"])
    cfg = make_config(server.url, teacher__thinking=True)
    ans = ask(cfg)
    assert ans.content == "" and ans.reasoning and ans.finish_reason == "length"
    assert ans.flags == ["truncated_reasoning"]


def test_a_server_refusing_logprobs_in_thinking_mode_is_told_once_and_the_text_distilled(
        fake_server, make_config, caplog):
    server = fake_server(reasoning_field="reasoning_content", refuse_logprobs=True)
    cfg = make_config(server.url, teacher__thinking=True, teacher__top_logprobs=3)

    async def go():
        async with make_client(cfg.teacher) as client:
            return [await client.complete(Request.build(cfg.teacher, p)) for p in ("问题一？", "问题二？")]
    with caplog.at_level("WARNING", logger="shifu"):
        answers = asyncio.run(go())
    assert all(a.content and a.reasoning and a.logprobs is None for a in answers)
    assert len([r for r in caplog.records if "refuses logprobs" in r.getMessage()]) == 1
    assert server.received == 3  # one refusal, then every request without logprobs


def test_reasoning_is_stored_and_an_old_store_gains_the_column(tmp_path):
    path = tmp_path / "teacher.sqlite"
    old = sqlite3.connect(path)  # the schema before the reasoning column, with one answer in it
    old.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, status TEXT NOT NULL, content TEXT, finish_reason TEXT, "
                "flags TEXT, usage TEXT, cost REAL, logprobs BLOB, error TEXT, attempts INTEGER NOT NULL DEFAULT 0, "
                "updated_at REAL NOT NULL)")
    old.execute("INSERT INTO answers VALUES ('old', 'ok', '旧答案', 'stop', '[]', '{}', 0.1, NULL, NULL, 1, 0)")
    old.commit()
    old.close()
    with Store(path) as store:
        assert store.get("old")["content"] == "旧答案" and store.get("old")["reasoning"] == ""
        store.put_ok("new", Answer("答案", "stop", {}, None, [], "先想一想。"), 0.2, 1)
        store.put_failed("bad", "HTTP 400", 1)
    with Store(path) as store:  # opening a migrated store again changes nothing
        assert store.get("new")["reasoning"] == "先想一想。" and store.totals()["stored_answers"] == 2


def test_teach_then_dataset_keeps_the_reasoning_and_estimate_counts_it(fake_server, make_config):
    server = fake_server(reasoning_field="reasoning")
    cfg = make_config(server.url, teacher__thinking=True, teacher__expected_reasoning_tokens=300)
    from shifu.estimate import teacher_estimate

    est = teacher_estimate(cfg)
    plain = teacher_estimate(make_config(server.url))
    assert est["expected_reasoning_tokens"] == 300 * est["requests"]
    assert est["expected_output_tokens"] == plain["expected_output_tokens"] + 300 * est["requests"]
    stats = run_stage("teach", cfg)
    assert stats["complete"] and 0 < stats["reasoning_tokens"] < stats["completion_tokens"]
    run_stage("dataset", cfg)
    examples = [e for e in read_jsonl(cfg.examples_path) if e["key"]]
    assert examples and all(e["reasoning"].startswith("Let me think.") for e in examples)
    alpaca = list(read_jsonl(cfg.jsonl_output_path))
    assert all(list(r) == ["instruction", "input", "output", "chunk_id", "category"] for r in alpaca)


# ---- datasets other tools train on --------------------------------------------------------------

def test_the_three_export_formats_read_back_with_dataset_info(fake_server, make_config, tmp_path):
    server = fake_server(reasoning_field="reasoning_content")
    cfg = make_config(server.url, teacher__thinking=True, dataset__formats=["messages", "sharegpt"],
                      train__system_prompt="你是助手。")
    info_path = tmp_path / "data" / "dataset_info.json"
    info_path.parent.mkdir(parents=True)
    info_path.write_text(json.dumps({"someone_elses": {"file_name": "x.json"}}))
    teach(cfg)
    stats = run_stage("dataset", cfg)
    assert stats["train_examples"] > 0
    alpaca = list(read_jsonl(cfg.jsonl_output_path))
    examples = {(e["instruction"], e["input"], e["output"]): e for e in read_jsonl(cfg.examples_path)
                if e["split"] == "train"}
    messages = list(read_jsonl(tmp_path / "data" / "distill.messages.jsonl"))
    sharegpt = list(read_jsonl(tmp_path / "data" / "distill.sharegpt.jsonl"))
    assert len(alpaca) == len(messages) == len(sharegpt)
    for row, m, s in zip(alpaca, messages, sharegpt):
        assert list(row) == ["instruction", "input", "output", "chunk_id", "category"]
        user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        reasoning = examples[(row["instruction"], row["input"], row["output"])].get("reasoning", "")
        system, asked, answered = m["messages"]
        assert system == {"role": "system", "content": "你是助手。"} and asked == {"role": "user", "content": user}
        assert answered["content"] == row["output"] and answered.get("reasoning_content", "") == reasoning
        assert s["system"] == "你是助手。" and s["conversations"][0] == {"from": "human", "value": user}
        gpt = s["conversations"][1]["value"]
        assert gpt == (f"<think>\n{reasoning}\n</think>\n\n{row['output']}" if reasoning else row["output"])
    assert any(m["messages"][2].get("reasoning_content") for m in messages)  # the teacher thought
    info = json.loads(info_path.read_text())
    assert info["someone_elses"] == {"file_name": "x.json"}  # other datasets of the folder are kept
    assert info["distill"] == {"file_name": "distill.jsonl", "formatting": "alpaca",
                               "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    assert info["distill_sharegpt"]["tags"] == {"role_tag": "from", "content_tag": "value",
                                                "user_tag": "human", "assistant_tag": "gpt"}
    assert info["distill_sharegpt"]["columns"] == {"messages": "conversations", "system": "system"}
    assert info["distill_messages"] == {
        "file_name": "distill.messages.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}
    assert info["distill_eval_sharegpt"]["file_name"] == "distill.eval.sharegpt.jsonl"
    for entry in info.values():  # every file an entry names is there, beside dataset_info.json
        assert (info_path.parent / entry["file_name"]).exists() or entry["file_name"] == "x.json"


def test_without_formats_only_the_alpaca_files_are_written(fake_server, make_config, tmp_path):
    cfg = make_config(fake_server().url)
    teach(cfg)
    run_stage("dataset", cfg)
    names = {p.name for p in (tmp_path / "data").iterdir()}
    assert {"distill.jsonl", "distill.eval.jsonl"} <= names
    assert not [n for n in names if "messages" in n or "sharegpt" in n or n == "dataset_info.json"]


# ---- reasoning students -------------------------------------------------------------------------

# Qwen3's rule, cut down: the last assistant turn renders its reasoning_content inside <think>.
QWEN3_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.last and m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'].strip('\\n') }}\n</think>\n\n"
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EXAMPLE = {"instruction": "What is distillation?", "input": "", "output": "Teaching a small model.",
           "reasoning": "The user asks about distillation. A teacher trains a student."}


def _tok(tiny_student, template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_student)
    if template:
        tok.chat_template = template
    return tok


def _labelled(tok, examples, reasoning=("include", "think")) -> list[tuple[str, str]]:
    """(prompt text, labelled text) per example, read back through the training dataset's labels."""
    from shifu.encode import encode_examples
    from shifu.train import SFTDataset

    ds = SFTDataset(encode_examples(tok, examples, 256, None, None, reasoning))
    out = []
    for i in range(len(ds)):
        item = ds[i]
        keep = item["labels"] != -100
        assert keep.sum() and not keep[: keep.argmax()].any() and keep[keep.argmax():].all()
        out.append((tok.decode(item["input_ids"][~keep]), tok.decode(item["labels"][keep])))
    return out


def test_a_qwen3_style_student_learns_exactly_reasoning_and_answer(tiny_student):
    from shifu.reasoning import template_reasoning

    tok = _tok(tiny_student, QWEN3_STYLE)
    assert template_reasoning(tok, None) == ("<think>\n", "\n</think>\n\n")
    # train.reasoning does not matter here: the template's own rendering is the target
    for mode in ("include", "drop"):
        (prompt, target), = _labelled(tok, [EXAMPLE], (mode, "reasoning"))
        assert prompt == "<|im_start|>user\nWhat is distillation?<|im_end|>\n<|im_start|>assistant\n"
        assert target == f"<think>\n{EXAMPLE['reasoning']}\n</think>\n\n{EXAMPLE['output']}<|im_end|>"
        # and it is what the template itself renders for that conversation
        full = tok.apply_chat_template([{"role": "user", "content": EXAMPLE["instruction"]},
                                        {"role": "assistant", "content": EXAMPLE["output"],
                                         "reasoning_content": EXAMPLE["reasoning"]}], tokenize=False)
        assert full == prompt + target + "\n"


def test_other_students_include_the_reasoning_in_the_named_tag_or_drop_it(tiny_student):
    from shifu.reasoning import template_reasoning

    tok = _tok(tiny_student)  # plain ChatML: the template writes no reasoning
    assert template_reasoning(tok, None) is None
    (_, included), = _labelled(tok, [EXAMPLE], ("include", "reasoning"))
    assert included == f"<reasoning>\n{EXAMPLE['reasoning']}\n</reasoning>\n\n{EXAMPLE['output']}<|im_end|>"
    (_, dropped), = _labelled(tok, [EXAMPLE], ("drop", "reasoning"))
    assert dropped == f"{EXAMPLE['output']}<|im_end|>"
    plain = {k: v for k, v in EXAMPLE.items() if k != "reasoning"}
    assert _labelled(tok, [plain], ("include", "reasoning"))[0][1] == dropped


def test_the_final_answer_is_scored_without_its_reasoning():
    from shifu.reasoning import strip_reasoning

    assert strip_reasoning("<think>\nhmm, so\n</think>\n\nThe answer.") == "The answer."
    assert strip_reasoning("hmm, so\n</think>\n\nThe answer.") == "The answer."  # <think> was in the prompt
    assert strip_reasoning("<think>\nstill thinking when max_new_tokens ran out") == ""
    assert strip_reasoning("A plain answer.") == "A plain answer."
    assert strip_reasoning("<r>x</r> Done.", "r") == "Done."


def test_the_shipped_thinking_config_loads_and_fits_one_24_gb_gpu():
    from conftest import ROOT

    from shifu.config import load_config
    from shifu.estimate import memory_estimate

    cfg = load_config(str(ROOT / "configs" / "deepseek-thinking-qwen3-8b.yaml"))
    assert cfg.teacher.thinking and Request.build(cfg.teacher, "hi").params["thinking"] == {"type": "enabled"}
    est = memory_estimate(cfg)
    assert est["params"] == "8.19B" and est["total"] <= 24e9 / 2**30 - 0.5


# ---- multi-turn ---------------------------------------------------------------------------------

def _labelled_runs(item) -> tuple[list[list[int]], list[int]]:
    """Labelled runs of token ids, and the unlabelled ids after the first label."""
    runs, off, started = [], [], False
    for tid, lab in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if lab != -100:
            if not runs or not started:
                runs.append([])
            runs[-1].append(tid)
            started = True
        elif runs:
            off.append(tid)
            started = False
    return runs, off


def test_a_follow_up_trains_as_one_conversation_with_loss_on_both_answers(tiny_student):
    from shifu.encode import encode_examples
    from shifu.train import SFTDataset

    tok = _tok(tiny_student)
    ex = {"instruction": "And who teaches it?", "input": "", "output": "A larger teacher model.",
          "history": [{"user": "What is distillation?", "assistant": "Teaching a small model."}]}
    single = {"instruction": "What is distillation?", "input": "", "output": "Teaching a small model."}
    enc = encode_examples(tok, [ex, single], 256)
    item = SFTDataset(enc)[0]
    runs, off = _labelled_runs(item)
    assert [tok.decode(r) for r in runs] == ["Teaching a small model.<|im_end|>", "A larger teacher model.<|im_end|>"]
    assert tok.decode(off) == "\n<|im_start|>user\nAnd who teaches it?<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template([{"role": "user", "content": "What is distillation?"},
                                    {"role": "assistant", "content": "Teaching a small model."},
                                    {"role": "user", "content": "And who teaches it?"},
                                    {"role": "assistant", "content": "A larger teacher model."}], tokenize=False)
    assert tok.decode(item["input_ids"]) + "\n" == full
    assert enc.masked[1] == [] and len(_labelled_runs(SFTDataset(enc)[1])[0]) == 1  # a single turn as before


def test_follow_ups_are_asked_in_context_stored_exported_and_encoded(fake_server, make_config, tmp_path):
    from shifu.encode import encode_examples
    from shifu.reasoning import attach_extras
    from shifu.tasks import follow_up_answer_request
    from shifu.train import SFTDataset, read_split

    server = fake_server()
    cfg = make_config(server.url, tasks__follow_ups=True, dataset__formats=["messages"])
    stats = teach(cfg)
    assert stats["complete"]
    run_stage("dataset", cfg)
    follow = [e for e in read_jsonl(cfg.examples_path) if e.get("history")]
    firsts = {(e["instruction"], e["input"]): e["output"] for e in read_jsonl(cfg.examples_path) if e["key"]}
    assert follow and all(e["key"] and e["category"] == "问答" for e in follow)
    for e in follow:  # the first exchange is the open-book question with the teacher's own answer to it
        (turn,) = e["history"]
        req = follow_up_answer_request(turn["user"], turn["assistant"], e["instruction"], cfg)
        assert req.key == e["key"] and [m["role"] for m in req.messages] == ["user", "assistant", "user"]
        assert any(turn["user"] == f"{i}\n\n{n}" and o == turn["assistant"] for (i, n), o in firsts.items())
    conversations = [m["messages"] for m in read_jsonl(tmp_path / "data" / "distill.messages.jsonl")]
    assert any([m["role"] for m in c] == ["user", "assistant", "user", "assistant"] for c in conversations)
    train, _ = read_split(cfg)
    assert all(list(r) == ["instruction", "input", "output", "chunk_id", "category"] for r in train)
    rows = [r for r in attach_extras(cfg, train) if r.get("history")]
    assert rows
    tok = _tok(cfg.model_name)
    item = SFTDataset(encode_examples(tok, rows[:1], 1024))[0]
    runs, _ = _labelled_runs(item)
    assert [tok.decode(r) for r in runs] == [rows[0]["history"][0]["assistant"] + "<|im_end|>",
                                             rows[0]["output"] + "<|im_end|>"]


def test_training_reads_reasoning_and_follow_ups_from_the_run(fake_server, make_config, tiny_student, tmp_path):
    import shutil

    from shifu.encode import _load

    student = tmp_path / "qwen3ish"
    shutil.copytree(tiny_student, student)
    _tok(tiny_student, QWEN3_STYLE).save_pretrained(student)
    server = fake_server(reasoning_field="reasoning_content")
    cfg = make_config(server.url, model_name=str(student), teacher__thinking=True, tasks__follow_ups=True,
                      max_length=512, train__max_steps=1, eval__eval_ratio=0.0)
    teach(cfg)
    run_stage("dataset", cfg)
    assert run_stage("train", cfg)["steps"] == 1
    (cache,) = (cfg.work / "cache").glob("encoded-*.npz")
    enc = _load(cache)
    tok = _tok(student)
    texts = [tok.decode(ids[start:]) for ids, start in zip(enc.input_ids, enc.answer_start)]
    assert sum(t.startswith("<think>\nLet me think.") for t in texts) > 0  # reasoning + answer, as Qwen3 writes it
    assert enc.masked and sum(bool(m) for m in enc.masked) > 0  # follow-ups: the second user turn unlabelled


def test_the_judge_of_a_thinking_run_does_not_think(make_config):
    from shifu.judge import judge_teacher

    jt = judge_teacher(make_config(teacher__thinking=True))
    assert not jt.thinking and Request.build(jt, "[[A]]").params["thinking"] == {"type": "disabled"}
