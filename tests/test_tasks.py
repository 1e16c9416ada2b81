"""Tasks: kinds and templates, the teacher/text split, text continuations, and parsing questions."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_EN, SAMPLE_ZH

from shifu.errors import UserError
from shifu.files import read_jsonl
from shifu.tasks import make_tasks, parse_questions, qa_answer_task, run_tasks, split_for_continuation

ZH = SAMPLE_ZH.read_text(encoding="utf-8").split("\n\n")[1][:400]
EN = " ".join(SAMPLE_EN.read_text(encoding="utf-8").split())[200:650]


def chunks(n: int = 2) -> list[dict]:
    """n chunks alternating Chinese and English, each a little different."""
    return [{"chunk_id": i, "lang": "zh" if i % 2 == 0 else "en", "source": "x.txt", "start": 0, "end": 0,
             "text": (ZH if i % 2 == 0 else EN) + f" ({i})"} for i in range(n)]


# ---- kinds and templates ------------------------------------------------------------------------

def test_teacher_tasks_for_qa_and_article_in_the_chunks_language(make_config):
    tasks = make_tasks(chunks(2), make_config(teacher_data_ratio=1.0, tasks__qa_per_chunk=3))
    assert [(t["chunk_id"], t["kind"], t["lang"], t["category"], t["source"]) for t in tasks] == [
        (0, "qa", "zh", "问答", "teacher"), (0, "article", "zh", "文章生成", "teacher"),
        (1, "qa", "en", "问答", "teacher"), (1, "article", "en", "文章生成", "teacher")]
    zh_qa, zh_article, en_qa, en_article = tasks
    assert "提出3个" in zh_qa["instruction"] and zh_qa["parse"] == "json_qa"
    assert "write 3 questions" in en_qa["instruction"] and '{"questions": [' in en_qa["instruction"]
    assert "续写" in zh_article["instruction"] and "Continue" in en_article["instruction"]
    # the chunk comes first in every input (continuations add a cue after it)
    assert all(t["input"].startswith(c["text"]) for t, c in zip(tasks, [chunks(2)[0]] * 2 + [chunks(2)[1]] * 2))
    assert zh_qa["input"] == chunks(2)[0]["text"] and zh_article["input"].endswith("（请从这里接着往下写）")
    assert len({t["task_id"] for t in tasks}) == 4


def test_language_override_and_disabled_kinds(make_config):
    tasks = make_tasks(chunks(2), make_config(tasks__language="en", enable_qa=False))
    assert [(t["kind"], t["lang"]) for t in tasks] == [("article", "en"), ("article", "en")]
    assert all(t["instruction"].startswith("Continue") for t in tasks)


def test_custom_kinds_add_and_override_without_code(make_config):
    custom = {
        "summary": {"category": "文章生成", "instruction": "用一句话概括下面的文字（{n}）：", "input": "【原文】{chunk}"},
        "article": {"category": "文章生成", "instruction": "Rewrite {{politely}}:\n{chunk}", "input": ""},
        "qa_answer": {"category": "问答", "instruction": "Q: {question}"},
    }
    cfg = make_config(tasks__custom=custom, tasks__qa_per_chunk=2)
    tasks = make_tasks(chunks(1), cfg)
    by_kind = {t["kind"]: t for t in tasks}
    assert set(by_kind) == {"qa", "article", "summary"}
    assert by_kind["summary"]["instruction"] == "用一句话概括下面的文字（2）："
    assert by_kind["summary"]["input"] == "【原文】" + chunks(1)[0]["text"] and by_kind["summary"]["parse"] == "text"
    assert by_kind["article"]["instruction"] == "Rewrite {politely}:\n" + chunks(1)[0]["text"]
    assert qa_answer_task(by_kind["qa"], "孔乙己是谁？", cfg) == ("Q: 孔乙己是谁？", chunks(1)[0]["text"])


def test_a_template_with_a_stray_brace_is_a_clear_error_before_any_stage(make_config):
    with pytest.raises(UserError, match=r"tasks.custom.bad.instruction: bad placeholder.*\{chunk\}"):
        make_config(tasks__custom={"bad": {"category": "问答", "instruction": "Use {chunk_text} here"}})


# ---- teacher_data_ratio -------------------------------------------------------------------------

def _teacher_pairs(tasks):
    return {(t["chunk_id"], t["kind"]) for t in tasks if t["source"] == "teacher"}


def test_teacher_data_ratio_is_deterministic_under_a_seed_and_about_right(make_config):
    many = chunks(1000)
    cfg = make_config(teacher_data_ratio=0.3, tasks__seed=11)
    first, again = make_tasks(many, cfg), make_tasks(many, cfg)
    assert first == again
    share = len(_teacher_pairs(first)) / (len(many) * 2)
    assert 0.27 < share < 0.33
    other = make_tasks(many, make_config(teacher_data_ratio=0.3, tasks__seed=12))
    assert _teacher_pairs(other) != _teacher_pairs(first)
    # Raising the ratio only adds teacher tasks: the same seed keeps the earlier choices.
    more = make_tasks(many, make_config(teacher_data_ratio=0.6, tasks__seed=11))
    assert _teacher_pairs(first) < _teacher_pairs(more)
    assert make_tasks(many, make_config(teacher_data_ratio=0.0)) and not _teacher_pairs(
        make_tasks(many, make_config(teacher_data_ratio=0.0)))


def test_text_continuations_target_the_real_following_passage(make_config):
    cfg = make_config(teacher_data_ratio=0.0, tasks__continuation_chars=120)
    source = chunks(4)
    tasks = make_tasks(source, cfg)
    assert [t["chunk_id"] for t in tasks] == [0, 1, 2, 3]  # one per chunk: a second would be the same example
    for task, chunk in zip(tasks, source):
        assert (task["kind"], task["category"], task["source"]) == ("text_continuation", "文章生成", "text")
        text = chunk["text"]
        head = text.index(task["output"])
        assert text[:head].strip() == task["input"] and text[head:].strip() == task["output"]
        assert task["input"][-1] in "。！？.!?”\"，,;；"  # the prompt ends at a sentence or clause end
        assert 60 <= len(task["output"]) <= 180
        assert task["instruction"] in ("请用与下面这段文字相同的文风续写。", "Continue the following passage in the same style.")
    assert tasks[0]["input"][-1] in "。！？”"  # Chinese prose has a sentence end near any length


def test_continuation_falls_back_to_clauses_then_spaces():
    clauses = "，".join(f"第{i}个分句" for i in range(40))
    head, tail = split_for_continuation(clauses, 60)
    assert head.endswith("，") and head + tail == clauses
    words = " ".join(f"word{i}" for i in range(60))
    head, tail = split_for_continuation(words, 60)
    assert f"{head} {tail}" == words
    assert split_for_continuation("孔乙己" * 100, 60) is None  # nowhere to cut: no text task


def test_run_tasks_writes_tasks_and_counts(make_config):
    cfg = make_config(teacher_data_ratio=0.5)
    cfg.work.mkdir(parents=True)
    records = chunks(40) + [{"chunk_id": 40, "lang": "zh", "text": "孔乙己" * 100}]
    (cfg.work / "chunks.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in records),
                                           encoding="utf-8")
    stats = run_tasks(cfg)
    written = list(read_jsonl(cfg.work / "tasks.jsonl"))
    assert written == make_tasks(records, cfg)
    assert stats["tasks"] == len(written) == stats["teacher_tasks"] + stats["text_tasks"]
    assert stats["teacher_tasks"] == len(_teacher_pairs(written))
    assert stats["chunks_without_task"] == len(records) - len({t["chunk_id"] for t in written})


# ---- parsing the teacher's questions ------------------------------------------------------------

@pytest.mark.parametrize("content", [
    '{"questions": ["孔乙己是谁？", "咸亨酒店在哪里？"]}',
    '```json\n{"questions": ["孔乙己是谁？", "咸亨酒店在哪里？"]}\n```',
    '好的，以下是问题：\n{"questions": ["孔乙己是谁？", "咸亨酒店在哪里？"]}\n希望有帮助。',
    '["孔乙己是谁？", "咸亨酒店在哪里？"]',
    '[{"question": "孔乙己是谁？"}, {"q": "咸亨酒店在哪里？"}]',
    '{"1": "孔乙己是谁？", "2": "咸亨酒店在哪里？"}',
    '{"result": {"items": [{"问题": "孔乙己是谁？"}, {"问题": "咸亨酒店在哪里？"}]}}',
    'See [1] below.\n{"questions": ["孔乙己是谁？", "咸亨酒店在哪里？", "孔乙己是谁？", "短"]}',
])
def test_parse_questions_is_robust_to_shapes_and_wrapping(content):
    assert parse_questions(content, 5) == ["孔乙己是谁？", "咸亨酒店在哪里？"]


def test_parse_questions_keeps_the_limit():
    content = json.dumps({"questions": [f"Question number {i}?" for i in range(6)]})
    assert parse_questions(content, 2) == ["Question number 0?", "Question number 1?"]


@pytest.mark.parametrize("content,reason", [
    ("I cannot think of any questions.", "no JSON"),
    ('{"questions": ["孔乙己是谁？", "咸亨', "malformed or cut off"),
    ('{"questions": []}', "holds no questions"),
    ('{"questions": [1, 2, null]}', "holds no questions"),
])
def test_parse_questions_rejects_malformed_answers(content, reason):
    with pytest.raises(ValueError, match=reason):
        parse_questions(content, 3)
