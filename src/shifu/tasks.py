"""Stage 2: turn chunks into pseudo-prompts (tasks) for the teacher, and each task into the teacher
requests it takes. Pure: no network, no model.

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
part of the chunk is the prompt and the real passage that follows it is the target (cut at a
sentence end, or a clause or space where no sentence end is near the wanted length; at most one such
example per chunk, since a second would be the same example). Both parts come from one chunk, so
the train/eval split by chunk stays clean.
Templates exist in Chinese and English; each chunk gets the one of its language. In any template,
{chunk}, {n} (questions wanted) and {question} are filled in; double a brace to write it literally.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Callable

from shifu.chunk import LEVELS, SENTENCE_END
from shifu.config import Config, TemplateConfig
from shifu.errors import UserError
from shifu.files import read_jsonl, write_jsonl
from shifu.records import Chunk, StoredAnswer, Task
from shifu.teacher import Request

TEMPLATES: dict[str, dict[str, TemplateConfig]] = {
    "zh": {
        "qa": TemplateConfig(
            category="问答", parse="json_qa",
            instruction=("阅读下面的文本，用中文提出{n}个能够根据这段文本回答的问题。要求：问题具体、互不重复；"
                         "每个问题不看原文也能读懂（写明人名、地名、事件等必要信息，不要说“文中”“这段文字”）。"
                         "只输出 JSON，格式为 {{\"questions\": [\"问题1\", \"问题2\"]}}。")),
        "qa_answer": TemplateConfig(
            category="问答", instruction="请根据下面的文本，用中文回答文末的问题。回答准确、完整，直接给出答案。",
            input="{chunk}\n\n问题：{question}"),
        "article": TemplateConfig(
            category="文章生成", instruction="请用与下面这段文字相同的文风，用中文续写。直接输出续写的新内容，不要重复或改写原文。",
            input="{chunk}\n\n（请从这里接着往下写）"),
    },
    "en": {
        "qa": TemplateConfig(
            category="问答", parse="json_qa",
            instruction=("Read the text below and write {n} questions that it answers. Make them specific and "
                         "distinct, and understandable without the text (name the people, places and events; "
                         "do not say 'the text' or 'the passage'). Output only JSON in the form "
                         "{{\"questions\": [\"question 1\", \"question 2\"]}}.")),
        "qa_answer": TemplateConfig(
            category="问答", instruction="Answer the question at the end from the text below. Be accurate and complete; give the answer directly.",
            input="{chunk}\n\nQuestion: {question}"),
        "article": TemplateConfig(
            category="文章生成", instruction="Continue the following passage in the same style. Output only the continuation; do not repeat the passage.",
            input="{chunk}\n\n(Continue from here.)"),
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
    """Prompt = the chunk's head, target = the real passage after it: about target_chars (at most half
    the chunk), cut at the sentence end nearest that length; at a clause, else a space, only where no
    sentence end lies within target_chars/2 of it. None if there is no cut that leaves both parts at
    least a quarter of the chunk (and 10 characters of target)."""
    want = max(len(text) - target_chars, len(text) // 2)
    best = None
    for pattern in (SENTENCE_END, LEVELS[3], LEVELS[5]):  # sentence end, clause, space
        cuts = [m.end() for m in pattern.finditer(text) if len(text) // 4 <= m.end() <= len(text) - 10]
        if not cuts:
            continue
        cut = min(cuts, key=lambda e: abs(e - want))
        if best is None or abs(cut - want) <= target_chars // 2:
            best = cut  # the strongest boundary at all, unless a weaker one is near the wanted length
        if abs(cut - want) <= target_chars // 2:
            break
    if best is None:
        return None
    return text[:best].strip(), text[best:].strip()


def make_tasks(chunks: list[Chunk], cfg: Config) -> list[Task]:
    """Chunk records in, task records out. Each task is either a teacher request or a finished example."""
    kinds = [k for k, on in (("qa", cfg.enable_qa), ("article", cfg.enable_article)) if on]
    kinds += [k for k in cfg.tasks.custom if k not in ("qa", "article", "qa_answer")]
    tasks = []
    for chunk in chunks:
        lang = chunk["lang"] if cfg.tasks.language == "auto" else cfg.tasks.language
        lang = lang if lang in TEMPLATES else "en"
        tpl = templates_for(lang, cfg)
        from_text = False
        for kind in kinds:
            base = {"task_id": f"{chunk['chunk_id']}-{kind}", "chunk_id": chunk["chunk_id"], "kind": kind,
                    "lang": lang, "category": tpl[kind].category}
            if goes_to_teacher(cfg.tasks.seed, chunk["chunk_id"], kind, cfg.teacher_data_ratio):
                values = {"chunk": chunk["text"], "n": str(cfg.tasks.qa_per_chunk), "question": ""}
                tasks.append({**base, "source": "teacher", "parse": tpl[kind].parse,
                              "instruction": fill(tpl[kind].instruction, **values),
                              "input": fill(tpl[kind].input, **values)})
                continue
            split = None if from_text else split_for_continuation(chunk["text"], cfg.tasks.continuation_chars)
            if split is not None:
                from_text = True
                tasks.append({**base, "task_id": f"{chunk['chunk_id']}-text", "kind": "text_continuation",
                              "category": "文章生成", "source": "text", "instruction": TEXT_CONTINUATION[lang],
                              "input": split[0], "output": split[1]})
    return tasks


def qa_answer_task(task: Task, question: str, cfg: Config) -> tuple[str, str]:
    """(instruction, input) of the open-book prompt that answers one proposed question.

    The built-in templates keep the instruction fixed and put the question after the chunk, so every
    question on one chunk shares the prompt's prefix: DeepSeek bills cached input at a fiftieth of
    the price, and llama.cpp and vLLM reuse the prefix's computation."""
    tpl = templates_for(task["lang"], cfg)["qa_answer"]
    values = {"question": question, "n": "", "chunk": task["input"]}
    return fill(tpl.instruction, **values), fill(tpl.input, **values)


_QUESTION_KEYS = ("question", "q", "问题", "text", "content")


def _question_list(obj) -> list:
    """The list that holds the questions: the object itself, the first list inside a dict (depth
    first), or a dict's string values ({"1": "...", "2": "..."})."""
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for value in obj.values():
            found = _question_list(value) if isinstance(value, (list, dict)) else None
            if found:
                return found
        return [v for v in obj.values() if isinstance(v, str)]
    return []


def _questions_in(obj, limit: int) -> list[str]:
    questions = []
    for q in _question_list(obj):
        if isinstance(q, dict):
            q = next((q[k] for k in _QUESTION_KEYS if isinstance(q.get(k), str)), None)
        if isinstance(q, str) and len(q.strip()) >= 4 and q.strip() not in questions:
            questions.append(q.strip())
    return questions[:limit]


def parse_questions(content: str, limit: int) -> list[str]:
    """Questions from a JSON answer, tolerant of code fences, prose around the JSON, and shapes
    like {"questions": [...]}, [...], [{"question": ...}] or {"1": "...", "2": "..."}: the first
    JSON value in the text that holds questions wins. Raises ValueError when there are none."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[{\[]", content)]
    if not starts:
        raise ValueError("no JSON in the answer")
    decoded = False
    for start in starts:
        try:
            obj, _ = decoder.raw_decode(content, start)
        except json.JSONDecodeError:
            continue
        decoded = True
        questions = _questions_in(obj, limit)
        if questions:
            return questions
    raise ValueError("JSON holds no questions" if decoded else "JSON is malformed or cut off")


# ---- teacher requests of a task (pure): teach sends them, dataset and estimate look them up ------

REASK = {"zh": "\n\n只输出一个 JSON 对象，不要输出其他内容。", "en": "\n\nOutput a single JSON object and nothing else."}


def task_request(task: Task, cfg: Config, reask: bool = False) -> Request:
    prompt = format_prompt(task["instruction"], task["input"])
    json_qa = task["parse"] == "json_qa"
    if reask:
        prompt += REASK[task["lang"]]
    return Request.build(cfg.teacher, prompt, json_mode=json_qa, logprobs=not json_qa)


def answer_requests(task: Task, questions: list[str], cfg: Config) -> list[tuple[str, Request]]:
    out = []
    for q in questions:
        instruction, input_ = qa_answer_task(task, q, cfg)
        out.append((q, Request.build(cfg.teacher, format_prompt(instruction, input_))))
    return out


FOLLOW_UP = {
    "zh": ("下面是一段文字、读者就它提出的问题和得到的回答。请写出这位读者接下来最可能就这段文字追问的一个问题。"
           "只输出这个问题。\n\n文字：\n{chunk}\n\n问题：{question}\n\n回答：{answer}"),
    "en": ("Below are a passage, a reader's question about it and the answer they got. Write the one follow-up "
           "question this reader would most likely ask next about the passage. Output the question only."
           "\n\nPassage:\n{chunk}\n\nQuestion: {question}\n\nAnswer: {answer}"),
}


def follow_up_request(task: Task, question: str, answer: str, cfg: Config) -> Request:
    """The teacher proposes the follow-up question a reader would ask after the first exchange."""
    prompt = FOLLOW_UP.get(task["lang"], FOLLOW_UP["en"]).format(chunk=task["input"], question=question, answer=answer)
    return Request.build(cfg.teacher, prompt, logprobs=False)


def follow_up_question(content: str) -> str | None:
    """The proposed question: its first non-empty line, without a label or quotes; None when there is none."""
    lines = [ln.strip() for ln in content.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    q = re.sub(r"^(问题|追问|follow-up question|question)\s*[:：]\s*", "", lines[0], flags=re.I).strip("\"'“”「」 ")
    return q or None


def follow_up_answer_request(first_prompt: str, first_answer: str, question: str, cfg: Config) -> Request:
    """The follow-up, answered with the first exchange (passage, question, answer) in context."""
    history = [{"role": "user", "content": first_prompt}, {"role": "assistant", "content": first_answer}]
    return Request.build(cfg.teacher, question, logprobs=False, history=history)


def questions_for(task: Task, cfg: Config, get: Callable[[str], StoredAnswer | None]) -> tuple[list[str] | None, str]:
    """Questions from the stored proposal, or its re-ask; (None, reason) when neither parses yet."""
    reason = "no stored proposal"
    for reask in (False, True):
        stored = get(task_request(task, cfg, reask).key)
        if stored is None:
            return None, reason
        try:
            return parse_questions(stored["content"], cfg.tasks.qa_per_chunk), ""
        except ValueError as err:
            reason = f"malformed questions: {err}"
    return None, reason


def run_tasks(cfg: Config) -> dict:
    chunks = list(read_jsonl(cfg.chunks_path))
    tasks = make_tasks(chunks, cfg)
    write_jsonl(cfg.tasks_path, tasks)
    by_source = {s: sum(t["source"] == s for t in tasks) for s in ("teacher", "text")}
    return {"tasks": len(tasks), "teacher_tasks": by_source["teacher"], "text_tasks": by_source["text"],
            "chunks_without_task": len(chunks) - len({t["chunk_id"] for t in tasks}),
            "path": str(cfg.tasks_path)}
