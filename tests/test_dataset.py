"""Dataset: the exact JSONL schema, the split by chunk, QA modes, and every rejection reason."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SAMPLE_EN, SAMPLE_ZH

from shifu.dataset import FIELDS, build_examples, eval_chunks, run_dataset
from shifu.files import read_jsonl, write_jsonl
from shifu.store import Store
from shifu.tasks import answer_requests, make_tasks, task_request
from shifu.teacher import Answer

ZH_PARAS = [p for p in SAMPLE_ZH.read_text(encoding="utf-8").split("\n\n") if len(p) > 120]
EN_TEXT = " ".join(SAMPLE_EN.read_text(encoding="utf-8").split())


def make_chunks(n: int) -> list[dict]:
    """n chunks, Chinese on even ids and English on odd ones, all different."""
    out = []
    for i in range(n):
        text = ZH_PARAS[i % len(ZH_PARAS)][:200] + f"（{i}）" if i % 2 == 0 else EN_TEXT[i * 150:i * 150 + 300]
        out.append({"chunk_id": i, "lang": "zh" if i % 2 == 0 else "en", "source": "s.txt", "start": 0,
                    "end": len(text), "text": text})
    return out


ZH_WORDS = "孔乙己 酒店 掌柜 茴香豆 长衫 短衣帮 柜台 黄酒 温酒 伙计 铜钱 笑声 秀才 举人 偷书 粉板 中秋 冬天 蒲包 门槛".split()
EN_WORDS = "rabbit watch waistcoat pocket hedge well cupboard jar shelf map latitude tunnel lamp hall door".split()


def good_answer(task: dict, what: str) -> str:
    """A teacher answer in the task's language: 40 words drawn at random, so every one is different."""
    rng = random.Random(f"{task['chunk_id']}-{task['kind']}-{what}")
    if task["lang"] == "zh":
        return "，".join("".join(rng.choice(ZH_WORDS) for _ in range(4)) for _ in range(10)) + "。"
    return " ".join(rng.choice(EN_WORDS) for _ in range(40)).capitalize() + "."


def questions(task: dict) -> list[str]:
    if task["lang"] == "zh":
        return [f"第{task['chunk_id']}段里孔乙己做了什么？", f"第{task['chunk_id']}段的酒店叫什么名字？"]
    i = task["chunk_id"]
    return [f"What does Alice do in passage {i}?", f"Whom does Alice follow in passage {i}?"]


def teacher_answers(tasks: list[dict], cfg, override=None) -> dict[str, dict]:
    """What the teacher store would hold after `shifu teach`: key -> stored answer.
    override(task, what) may return (content, flags) to replace an answer, or 'skip' to leave it out."""
    store: dict[str, dict] = {}

    def put(key, task, what, default):
        got = override(task, what) if override else None
        if got == "skip":
            return
        content, flags = got if got else (default, [])
        store[key] = {"content": content, "flags": flags}

    for task in tasks:
        if task["source"] != "teacher":
            continue
        if task["parse"] == "json_qa":
            qs = questions(task)
            put(task_request(task, cfg).key, task, "proposal", json.dumps({"questions": qs}, ensure_ascii=False))
            for k, (_, req) in enumerate(answer_requests(task, qs, cfg)):
                put(req.key, task, f"answer{k}", good_answer(task, f"answer {k}"))
        else:
            put(task_request(task, cfg).key, task, task["kind"], good_answer(task, task["kind"]))
    return store


def setup_work(cfg, chunks: list[dict], tasks: list[dict], answers: dict[str, dict]) -> None:
    cfg.work.mkdir(parents=True, exist_ok=True)
    write_jsonl(cfg.work / "chunks.jsonl", chunks)
    write_jsonl(cfg.work / "tasks.jsonl", tasks)
    store = Store(cfg.work / "teacher.sqlite")
    for key, stored in answers.items():
        store.put_ok(key, Answer(stored["content"], "stop", flags=stored["flags"]), None, 1)
    store.close()


# ---- the files ----------------------------------------------------------------------------------

def test_exact_schema_and_a_split_that_never_shares_a_chunk(make_config):
    cfg = make_config(tasks__qa_mode="both", eval__eval_ratio=0.3, teacher_data_ratio=0.8)
    chunks = make_chunks(12)
    tasks = make_tasks(chunks, cfg)
    setup_work(cfg, chunks, tasks, teacher_answers(tasks, cfg))
    stats = run_dataset(cfg)
    train = [json.loads(line) for line in open(cfg.jsonl_output_path, encoding="utf-8")]
    held = [json.loads(line) for line in open(cfg.eval_jsonl_path, encoding="utf-8")]
    for row in train + held:
        assert list(row) == ["instruction", "input", "output", "chunk_id", "category"] == list(FIELDS)
        assert row["category"] in ("问答", "文章生成") and isinstance(row["chunk_id"], int)
        assert all(isinstance(row[k], str) for k in ("instruction", "input", "output")) and row["output"]
    train_chunks, eval_chunks_ = {r["chunk_id"] for r in train}, {r["chunk_id"] for r in held}
    assert train_chunks and eval_chunks_ and not train_chunks & eval_chunks_
    assert train_chunks | eval_chunks_ == set(range(12))
    assert {r["category"] for r in train + held} == {"问答", "文章生成"}
    assert (stats["train_examples"], stats["eval_examples"], stats["rejected"]) == (len(train), len(held), 0)
    assert stats["eval_chunks"] == len(eval_chunks_)
    assert (cfg.work / "rejected.jsonl").read_text(encoding="utf-8") == ""
    meta = list(read_jsonl(cfg.work / "examples.jsonl"))
    assert len(meta) == len(train) + len(held) and {m["split"] for m in meta} == {"train", "eval"}
    assert stats["teacher_examples"] == sum(m["key"] is not None for m in meta) > 0


@pytest.mark.parametrize("mode,per_question", [("open", 1), ("closed", 1), ("both", 2)])
def test_qa_modes_open_closed_and_both(make_config, mode, per_question):
    cfg = make_config(tasks__qa_mode=mode, enable_article=False)
    chunks = make_chunks(2)
    tasks = make_tasks(chunks, cfg)
    answers = teacher_answers(tasks, cfg)
    examples, rejected, counts = build_examples(tasks, {c["chunk_id"]: c for c in chunks}, cfg, answers.get)
    assert not rejected and not counts
    assert len(examples) == 2 * 2 * per_question and {e["category"] for e in examples} == {"问答"}
    for e in examples:
        chunk = chunks[e["chunk_id"]]
        if e["input"]:  # open book: the chunk in view, the question after it (a prefix shared per chunk)
            assert mode != "closed" and e["input"].startswith(chunk["text"])
            assert any(e["input"].endswith(q) for q in questions({**chunk, "chunk_id": e["chunk_id"]}))
        else:  # closed book: only a self-contained question
            assert mode != "open" and e["instruction"] in questions({**chunk, "chunk_id": e["chunk_id"]})


def test_text_examples_pass_through_and_need_no_teacher(make_config):
    cfg = make_config(teacher_data_ratio=0.0)
    chunks = make_chunks(4)
    tasks = make_tasks(chunks, cfg)
    examples, rejected, counts = build_examples(tasks, {c["chunk_id"]: c for c in chunks}, cfg, {}.get)
    assert len(examples) == 4 and not rejected and not counts
    for e in examples:
        assert e["category"] == "文章生成" and e["key"] is None
        whole = "".join(chunks[e["chunk_id"]]["text"].split())
        assert whole == "".join((e["input"] + e["output"]).split())


# ---- rejections ---------------------------------------------------------------------------------

def test_every_rejection_goes_to_rejected_jsonl_with_its_reason_and_count(make_config):
    cfg = make_config(tasks__qa_mode="open", teacher_data_ratio=1.0)
    chunks = make_chunks(10)
    tasks = make_tasks(chunks, cfg)
    quote = ZH_PARAS[0][:60]  # an answer may quote its chunk: that is not a copy
    six = good_answer({"chunk_id": 6, "kind": "article", "lang": "zh"}, "article")
    near_copy = six[:40] + " " + six[40:-1] + "！"

    def override(task, what):
        i, kind = task["chunk_id"], task["kind"]
        if kind == "article":
            return {0: ("好。", []),  # too short
                    1: ("Alice " * 3, ["truncated"]),
                    2: ("Alice fell down the rabbit hole and wondered about latitude.", []),  # wrong language
                    3: (chunks[3]["text"], []),  # a copy of the chunk
                    4: ("", ["empty"]),
                    5: ("I'm sorry, but I can't help with that.", ["refusal"]),
                    6: (good_answer(task, "article"), []),
                    8: (near_copy, []),  # a near-duplicate of 6's
                    }.get(i)
        if i == 0 and what == "answer0":
            return (quote, [])
        if i == 7 and what == "proposal":
            return ("Here are some questions: none, sorry.", [])  # malformed, and so is the re-ask
        if i == 9 and what == "answer1":
            return "skip"  # never answered
        return None

    answers = teacher_answers(tasks, cfg, override)
    t7 = next(t for t in tasks if t["chunk_id"] == 7 and t["kind"] == "qa")
    answers[task_request(t7, cfg, reask=True).key] = {"content": "[still not JSON", "flags": []}
    setup_work(cfg, chunks, tasks, answers)
    stats = run_dataset(cfg)
    rejected = list(read_jsonl(cfg.work / "rejected.jsonl"))
    reasons = {(r["chunk_id"], r["kind"]): r["reason"] for r in rejected}
    assert reasons == {(0, "article"): "too_short", (1, "article"): "truncated", (2, "article"): "wrong_language",
                       (3, "article"): "copy_of_chunk", (4, "article"): "empty", (5, "article"): "refusal",
                       (8, "article"): "near_duplicate", (7, "qa"): "malformed_questions"}
    assert next(r for r in rejected if r["reason"] == "malformed_questions")["output"] == "[still not JSON"
    assert all({"instruction", "input", "output", "chunk_id", "category", "reason"} <= set(r) for r in rejected)
    for reason in set(reasons.values()):
        assert stats[f"rejected:{reason}"] == sum(r == reason for r in reasons.values())
    assert stats["rejected"] == len(rejected) == 8
    assert stats["unanswered:no stored answer"] == 1
    kept = list(read_jsonl(cfg.work / "examples.jsonl"))
    assert any(e["output"] == quote for e in kept)  # the quoting answer was kept
    assert not {(e["chunk_id"], e["kind"]) for e in kept} & set(reasons)
    # 20 QA answers less chunk 7's two (no questions) and chunk 9's one (unanswered), and the articles of 6, 7, 9
    assert stats["examples"] == len(kept) == 20 - 2 - 1 + 3


def test_when_every_answer_is_rejected_the_error_points_to_a_rejected_jsonl_that_exists(make_config):
    from shifu.errors import UserError

    cfg = make_config(enable_qa=False, teacher_data_ratio=1.0)
    chunks = make_chunks(2)
    tasks = make_tasks(chunks, cfg)
    setup_work(cfg, chunks, tasks, teacher_answers(tasks, cfg, lambda task, what: ("好。", [])))
    with pytest.raises(UserError, match="2 rejected.*rejected.jsonl.*min_answer_chars"):
        run_dataset(cfg)
    assert [r["reason"] for r in read_jsonl(cfg.work / "rejected.jsonl")] == ["too_short", "too_short"]


def test_a_chunk_of_one_language_answered_in_the_templates_language_is_not_wrong(make_config):
    cfg = make_config(tasks__language="en", enable_qa=False)
    chunks = make_chunks(1)  # a Chinese chunk, English templates: an English answer is right
    tasks = make_tasks(chunks, cfg)
    answers = teacher_answers(tasks, cfg)
    examples, rejected, _ = build_examples(tasks, {0: chunks[0]}, cfg, answers.get)
    assert len(examples) == 1 and not rejected


# ---- the split ----------------------------------------------------------------------------------

def test_eval_chunks_are_deterministic_and_never_empty_or_everything():
    ids = list(range(50))
    held = eval_chunks(ids, 0.2, seed=1)
    assert held == eval_chunks(list(reversed(ids)), 0.2, seed=1) and len(held) == 10
    assert held != eval_chunks(ids, 0.2, seed=2)
    assert len(eval_chunks([3, 4], 0.01, seed=1)) == 1 and len(eval_chunks([3, 4], 0.99, seed=1)) == 1
    assert eval_chunks([3], 0.5, seed=1) == set() and eval_chunks(ids, 0.0, seed=1) == set()


def test_truncated_continuations_are_trimmed_only_when_asked(make_config):
    from shifu.dataset import trimmed

    cut = "他又说了一句话。然后走出门去，外面下着雨。雨越下越大，他"
    assert trimmed(cut, ["truncated"], "文章生成", make_config()) == (cut, ["truncated"])
    cfg = make_config(tasks__trim_truncated=True)
    assert trimmed(cut, ["truncated"], "文章生成", cfg) == ("他又说了一句话。然后走出门去，外面下着雨。", [])
    assert trimmed(cut, ["truncated"], "问答", cfg) == (cut, ["truncated"])  # answers are never trimmed
    assert trimmed(cut, ["truncated", "refusal"], "文章生成", cfg)[1] == ["truncated", "refusal"]
    assert trimmed("没有句号的一长串文字" * 3, ["truncated"], "文章生成", cfg)[1] == ["truncated"]
