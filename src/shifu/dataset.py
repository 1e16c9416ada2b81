"""Stage 4: assemble the Alpaca-style dataset from the tasks and the teacher's stored answers.

    shifu dataset configs/demo.yaml

Writes, one JSON object a line, exactly the fields of the original guide:
    {"instruction", "input", "output", "chunk_id", "category"}     category: 问答 | 文章生成
- `jsonl_output_path`: training examples; `<stem>.eval.jsonl`: held-out examples. The split is by
  chunk, so no chunk has examples on both sides.
- `<work_dir>/examples.jsonl`: every example with its split and the key of the teacher answer it
  came from (training uses it to find the stored logprobs).
- `<work_dir>/rejected.jsonl`: teacher outputs left out, with the reason: truncated, empty, refusal
  (flags set when the answer was stored), too_short, wrong_language (not the language of the task's
  template), copy_of_chunk (mostly a verbatim run of the chunk: for a continuation, any such output;
  for an answer, one that copies at least half the chunk, since quoting a sentence is a fine answer),
  near_duplicate (of an earlier kept output), or malformed_questions (a question proposal that
  held no parseable questions, even when asked again). Counts go into the summary as rejected:<reason>.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from collections import Counter
from typing import Callable

from shifu.chunk import SENTENCE_END
from shifu.config import Config
from shifu.dedup import Deduper, language
from shifu.errors import UserError
from shifu.files import read_jsonl, write_jsonl
from shifu.formats import write_formats
from shifu.records import Chunk, Example, StoredAnswer, Task
from shifu.store import Store
from shifu.tasks import (
    answer_requests,
    follow_up_answer_request,
    follow_up_question,
    follow_up_request,
    qa_answer_task,
    questions_for,
    task_request,
)

log = logging.getLogger("shifu")
Lookup = Callable[[str], StoredAnswer | None]  # answer key -> the stored answer, or None

FIELDS = ("instruction", "input", "output", "chunk_id", "category")


def rejection(output: str, flags: list[str], chunk: Chunk, cfg: Config, dedup: Deduper,
              lang: str | None = None, category: str = "文章生成") -> str | None:
    """Why a teacher output must not be trained on, or None. `lang` is the language the task asked in."""
    if flags:
        return flags[0]
    text = output.strip()
    if len(text) < cfg.tasks.min_answer_chars:
        return "too_short"
    if len(text) >= 30 and language(text) != (lang or chunk["lang"]):
        return "wrong_language"
    if len(text) >= 20:
        match = difflib.SequenceMatcher(None, chunk["text"], text, autojunk=False).find_longest_match()
        copied = match.size / len(text) > cfg.tasks.max_copy_ratio
        if copied and (category == "文章生成" or match.size >= len(chunk["text"]) / 2):
            return "copy_of_chunk"
    if dedup.is_duplicate(text):
        return "near_duplicate"
    return None


def trimmed(output: str, flags: list[str], category: str, cfg: Config) -> tuple[str, list[str]]:
    """A continuation cut off at max_tokens, cut back to its last full sentence when the config asks."""
    if not (cfg.tasks.trim_truncated and category == "文章生成" and flags == ["truncated"]):
        return output, flags
    ends = [m.end() for m in SENTENCE_END.finditer(output)]
    if not ends or ends[-1] < len(output) // 3:
        return output, flags
    return output[:ends[-1]], []


def _stored_proposal(task: Task, cfg: Config, get: Lookup) -> str:
    """The latest stored question proposal (the re-ask if there is one), for rejected.jsonl."""
    for reask in (True, False):
        stored = get(task_request(task, cfg, reask).key)
        if stored is not None:
            return stored["content"]
    return ""


def _teacher_examples(task: Task, cfg: Config, get: Lookup) -> list[tuple[dict, str | None, str]]:
    """(example, answer key or None, status) for one teacher task; status '' means answered."""
    if task["parse"] != "json_qa":
        req = task_request(task, cfg)
        return [({"instruction": task["instruction"], "input": task["input"]}, req.key, "")]
    questions, reason = questions_for(task, cfg, get)
    if questions is None:
        status = "malformed_questions" if reason.startswith("malformed") else reason
        return [({"instruction": task["instruction"], "input": task["input"]}, None, status)]
    out = []
    for q, req in answer_requests(task, questions, cfg):
        instruction, input_ = qa_answer_task(task, q, cfg)
        if cfg.tasks.qa_mode in ("open", "both"):
            out.append(({"instruction": instruction, "input": input_}, req.key, ""))
            if cfg.tasks.follow_ups:
                out += _follow_up(task, q, req, cfg, get)
        if cfg.tasks.qa_mode in ("closed", "both"):
            out.append(({"instruction": q, "input": ""}, req.key, ""))
    return out


def _follow_up(task: Task, question: str, req, cfg: Config, get: Lookup) -> list[tuple[dict, str | None, str]]:
    """tasks.follow_ups: the second turn of a conversation, the first exchange as its history."""
    first = get(req.key)
    if first is None or first["flags"] or not first["content"].strip():
        return []
    answer = first["content"].strip()
    proposed = get(follow_up_request(task, question, answer, cfg).key)
    q2 = follow_up_question(proposed["content"]) if proposed and not proposed["flags"] else None
    if not q2:
        return []
    prompt = req.messages[-1]["content"]
    return [({"instruction": q2, "input": "", "history": [{"user": prompt, "assistant": answer}]},
             follow_up_answer_request(prompt, answer, q2, cfg).key, "")]


def build_examples(tasks: list[Task], chunks: dict[int, Chunk], cfg: Config,
                   get: Lookup) -> tuple[list[Example], list[dict], Counter]:
    """Pure given `get` (key -> stored answer): examples with meta, rejected outputs, and counts."""
    examples, rejected, counts = [], [], Counter()
    dedup = Deduper(cfg.tasks.near_dup_threshold)
    verdicts: dict[str, str | None] = {}  # one verdict per answer, even when two examples share it
    for task in tasks:
        chunk = chunks[task["chunk_id"]]
        base = {"chunk_id": task["chunk_id"], "category": task["category"]}
        if task["source"] == "text":
            examples.append({"instruction": task["instruction"], "input": task["input"], "output": task["output"],
                             **base, "kind": task["kind"], "key": None})
            continue
        for ex, key, status in _teacher_examples(task, cfg, get):
            if status == "malformed_questions":
                counts["rejected:malformed_questions"] += 1
                rejected.append({**ex, "output": _stored_proposal(task, cfg, get), **base, "kind": task["kind"],
                                 "reason": status})
                continue
            stored = get(key) if key else None
            if stored is None:
                counts[f"unanswered:{status or 'no stored answer'}"] += 1
                continue
            output, flags = trimmed(stored["content"], stored["flags"], task["category"], cfg)
            if key not in verdicts:
                verdicts[key] = rejection(output, flags, chunk, cfg, dedup, task["lang"], task["category"])
                if flags != stored["flags"] and verdicts[key] is None:
                    counts["trimmed_continuations"] += 1
                if verdicts[key]:
                    counts[f"rejected:{verdicts[key]}"] += 1
                    rejected.append({**ex, "output": stored["content"], **base, "kind": task["kind"],
                                     "reason": verdicts[key]})
            if verdicts[key] is None:
                thought = {"reasoning": stored["reasoning"].strip()} if stored.get("reasoning") else {}
                examples.append({**ex, "output": output.strip(), **base, "kind": task["kind"], "key": key, **thought})
    return examples, rejected, counts


def eval_chunks(chunk_ids: list[int], ratio: float, seed: int) -> set[int]:
    """Deterministic held-out chunks: the lowest hashes; at least one when there are two or more."""
    ids = sorted(set(chunk_ids), key=lambda c: hashlib.sha256(f"eval:{seed}:{c}".encode()).hexdigest())
    n = round(ratio * len(ids))
    if ratio > 0 and len(ids) >= 2:
        n = min(max(n, 1), len(ids) - 1)
    return set(ids[:n])


def run_dataset(cfg: Config) -> dict:
    tasks = list(read_jsonl(cfg.tasks_path))
    chunks = {c["chunk_id"]: c for c in read_jsonl(cfg.chunks_path)}
    with Store(cfg.store_path) as store:
        examples, rejected, counts = build_examples(tasks, chunks, cfg, store.get)
    write_jsonl(cfg.rejected_path, rejected)  # first: the error below points to it
    if not examples:
        raise UserError(f"no usable examples: every teacher answer is missing or rejected ({len(rejected)} "
                        f"rejected, reasons in {cfg.rejected_path}); rerun `shifu teach` to retry "
                        "failed requests, or loosen tasks.min_answer_chars / tasks.max_copy_ratio")
    held = eval_chunks([e["chunk_id"] for e in examples], cfg.eval.eval_ratio, cfg.tasks.seed)
    for e in examples:
        e["split"] = "eval" if e["chunk_id"] in held else "train"
    write_jsonl(cfg.examples_path, examples)
    n_train = write_jsonl(cfg.jsonl_output_path, ({k: e[k] for k in FIELDS} for e in examples if e["split"] == "train"))
    n_eval = write_jsonl(cfg.eval_jsonl_path, ({k: e[k] for k in FIELDS} for e in examples if e["split"] == "eval"))
    formats = write_formats(cfg, examples)  # dataset.formats: messages, sharegpt, dataset_info.json
    by_cat = Counter(e["category"] for e in examples)
    unanswered = sum(v for k, v in counts.items() if k.startswith("unanswered:"))
    if unanswered:  # a partial teacher run: say so, in the log and in the summary
        log.warning("partial teacher run: %d teacher examples have no stored answer and are left out; "
                    "rerun `shifu teach` to complete it", unanswered)
    return {"unanswered": unanswered, "examples": len(examples), "train_examples": n_train, "eval_examples": n_eval,
            "eval_chunks": len(held), "by_category": dict(by_cat), "rejected": len(rejected),
            "teacher_examples": sum(e["key"] is not None for e in examples),
            **({"format_files": formats} if formats else {}), **dict(counts)}
