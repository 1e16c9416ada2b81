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
from shifu.pipeline import run_stage
from shifu.store import Store
from shifu.teacher import Answer, Request, answer_flags, make_client, price_of

PRICES = {"fake-teacher": {"input_cache_hit": 1.0, "input_cache_miss": 2.0, "output": 4.0}}


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
    assert stats["complete"]
    run_stage("dataset", cfg)
    examples = [e for e in read_jsonl(cfg.examples_path) if e["key"]]
    assert examples and all(e["reasoning"].startswith("Let me think.") for e in examples)
    alpaca = list(read_jsonl(cfg.jsonl_output_path))
    assert all(list(r) == ["instruction", "input", "output", "chunk_id", "category"] for r in alpaca)
