"""Stage 2: turn chunks into pseudo-prompts (tasks) for the teacher. Pure: no network, no model.

    shifu tasks configs/demo.yaml     # reads chunks.jsonl, writes <work_dir>/tasks.jsonl

Kinds:
- qa (问答): the teacher first proposes `qa_per_chunk` self-contained questions about the chunk
  (JSON output), then answers each with the chunk in view. The student sees either the chunk and
  the question (open book, as in the original guide) or the question alone (closed book, so it
  must learn the knowledge itself); `qa_mode: both` makes one of each from the same answer.
- article (文章生成): continue the chunk in the same style; the teacher's continuation is the target.
- custom kinds from `tasks.custom`, which may also override `qa`, `qa_answer` or `article`.

`teacher_data_ratio` decides, per chunk and kind, deterministically under `tasks.seed`, whether a
task goes to the teacher. The rest become continuation examples from the text itself: the first
part of the chunk is the prompt and the real passage that follows it is the target.
Templates exist in Chinese and English; each chunk gets the one of its language.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from shifu.config import Config, TemplateConfig
from shifu.errors import UserError
from shifu.files import read_jsonl, write_jsonl

TEMPLATES: dict[str, dict[str, TemplateConfig]] = {
    "zh": {
        "qa": TemplateConfig(
            category="问答", parse="json_qa",
            instruction=("阅读下面的文本，提出{n}个能够根据这段文本回答的问题。要求：问题具体、互不重复；"
                         "每个问题不看原文也能读懂（写明人名、地名、事件等必要信息，不要说“文中”“这段文字”）。"
                         "只输出 JSON，格式为 {{\"questions\": [\"问题1\", \"问题2\"]}}。")),
        "qa_answer": TemplateConfig(
            category="问答", instruction="请根据下面的文本回答问题。回答准确、完整，直接给出答案。\n问题：{question}"),
        "article": TemplateConfig(
            category="文章生成", instruction="请用与下面这段文字相同的文风续写，直接输出续写的内容，不要重复原文。"),
    },
    "en": {
        "qa": TemplateConfig(
            category="问答", parse="json_qa",
            instruction=("Read the text below and write {n} questions that it answers. Make them specific and "
                         "distinct, and understandable without the text (name the people, places and events; "
                         "do not say 'the text' or 'the passage'). Output only JSON in the form "
                         "{{\"questions\": [\"question 1\", \"question 2\"]}}.")),
        "qa_answer": TemplateConfig(
            category="问答", instruction="Answer the question from the text below. Be accurate and complete; give the answer directly.\nQuestion: {question}"),
        "article": TemplateConfig(
            category="文章生成", instruction="Continue the following passage in the same style. Output only the continuation; do not repeat the passage."),
    },
}
TEXT_CONTINUATION = {"zh": "请用与下面这段文字相同的文风续写。", "en": "Continue the following passage in the same style."}


def format_prompt(instruction: str, input: str = "") -> str:
    """The one way an (instruction, input) pair becomes a user message, for teacher and student alike."""
    return f"{instruction}\n\n{input}" if input else instruction


def templates_for(lang: str, cfg: Config) -> dict[str, TemplateConfig]:
    out = dict(TEMPLATES[lang])
    out.update(cfg.tasks.custom)
    return out


def fill(template: str, **values: str) -> str:
    """str.format, but a user's template with a stray brace gets a clear error, not a KeyError."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"tasks template {template[:40]!r}...: bad placeholder ({err}); "
                        f"use {{chunk}}, {{n}}, {{question}}, and double braces for literal ones") from None


def goes_to_teacher(seed: int, chunk_id: int, kind: str, ratio: float) -> bool:
    h = hashlib.sha256(f"{seed}:{chunk_id}:{kind}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < ratio


def split_for_continuation(text: str, target_chars: int) -> tuple[str, str] | None:
    """Prompt = the chunk's head, target = the real passage after it, cut at sentence ends."""
    ends = [m.end() for m in re.finditer(r"[。！？!?…]+[”’」』）)\"']*|\.(?=\s)", text)]
    want = max(len(text) - target_chars, len(text) // 2)
    cuts = [e for e in ends if len(text) // 4 <= e <= len(text) - 10]
    if not cuts:
        return None
    cut = min(cuts, key=lambda e: abs(e - want))
    return text[:cut].strip(), text[cut:].strip()


def make_tasks(chunks: list[dict], cfg: Config) -> list[dict]:
    """Chunk records in, task records out. Each task is either a teacher request or a finished example."""
    kinds = [k for k, on in (("qa", cfg.enable_qa), ("article", cfg.enable_article)) if on]
    kinds += [k for k in cfg.tasks.custom if k not in ("qa", "article", "qa_answer")]
    tasks = []
    for chunk in chunks:
        lang = chunk["lang"] if cfg.tasks.language == "auto" else cfg.tasks.language
        lang = lang if lang in TEMPLATES else "en"
        tpl = templates_for(lang, cfg)
        for kind in kinds:
            base = {"task_id": f"{chunk['chunk_id']}-{kind}", "chunk_id": chunk["chunk_id"], "kind": kind,
                    "lang": lang, "category": tpl[kind].category}
            if goes_to_teacher(cfg.tasks.seed, chunk["chunk_id"], kind, cfg.teacher_data_ratio):
                instruction = fill(tpl[kind].instruction, n=str(cfg.tasks.qa_per_chunk), question="")
                tasks.append({**base, "source": "teacher", "parse": tpl[kind].parse, "instruction": instruction,
                              "input": fill(tpl[kind].input, chunk=chunk["text"])})
                continue
            split = split_for_continuation(chunk["text"], cfg.tasks.continuation_chars)
            if split is not None:
                tasks.append({**base, "kind": "text_continuation", "category": "文章生成", "source": "text",
                              "instruction": TEXT_CONTINUATION[lang], "input": split[0], "output": split[1]})
    return tasks


def qa_answer_task(task: dict, question: str, cfg: Config) -> tuple[str, str]:
    """(instruction, input) of the open-book prompt that answers one proposed question."""
    tpl = templates_for(task["lang"], cfg)["qa_answer"]
    return fill(tpl.instruction, question=question, n=""), task["input"]


def parse_questions(content: str, limit: int) -> list[str]:
    """Questions from a JSON answer, tolerant of code fences, prose around the object, and shapes
    like {"questions": [...]}, [...], or [{"question": ...}]. Raises ValueError when there are none."""
    text = content.strip()
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON in the answer")
    obj, _ = json.JSONDecoder().raw_decode(text[start:])
    if isinstance(obj, dict):
        obj = next((v for v in obj.values() if isinstance(v, list)), [])
    questions = []
    for item in obj if isinstance(obj, list) else []:
        q = item.get("question") or item.get("q") if isinstance(item, dict) else item
        if isinstance(q, str) and len(q.strip()) >= 4 and q.strip() not in questions:
            questions.append(q.strip())
    if not questions:
        raise ValueError("JSON holds no questions")
    return questions[:limit]


def run_tasks(cfg: Config) -> dict:
    chunks = list(read_jsonl(cfg.work / "chunks.jsonl"))
    tasks = make_tasks(chunks, cfg)
    write_jsonl(cfg.work / "tasks.jsonl", tasks)
    by_source = {s: sum(t["source"] == s for t in tasks) for s in ("teacher", "text")}
    return {"tasks": len(tasks), "teacher_tasks": by_source["teacher"], "text_tasks": by_source["text"],
            "path": str(Path(cfg.work / "tasks.jsonl"))}
