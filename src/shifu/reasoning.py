"""A thinking teacher's reasoning in the student's training target, and out of its scored answers.

    parts = template_reasoning(tok, system_prompt)   # ("<think>\\n", "\\n</think>\\n\\n") for Qwen3, else None
    text = target_text(example, parts, cfg.train.reasoning, cfg.train.reasoning_tag)

A student whose chat template renders `reasoning_content` on the last assistant message (Qwen3)
learns the reasoning exactly as its template writes it, then the answer. Any other student
follows train.reasoning: include puts the reasoning inside <reasoning_tag>...</reasoning_tag>
before the answer, drop trains on the answer alone. The reasoning lives in work_dir/examples.jsonl
(the Alpaca files keep their five fields); `attach_extras` joins it to the rows training reads.
"""

from __future__ import annotations

import re

from shifu.config import Config
from shifu.files import read_jsonl
from shifu.formats import with_reasoning

_REASON, _ANSWER = "\x00SHIFU_REASON\x00", "\x00SHIFU_ANSWER\x00"


def template_reasoning(tok, system_prompt: str | None) -> tuple[str, str] | None:
    """(before, between): what the chat template writes before the reasoning and between it and the
    answer of the final assistant turn; None when the template leaves reasoning_content out."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": "u"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": _ANSWER, "reasoning_content": _REASON}],
                                   tokenize=False)
    if _REASON not in full or not full.startswith(prompt) or full.index(_REASON) > full.index(_ANSWER):
        return None
    before, between = full[len(prompt):full.index(_ANSWER)].split(_REASON)
    return before, between


def target_text(example: dict, parts: tuple[str, str] | None, mode: str, tag: str) -> str:
    """The assistant text the student learns: reasoning (as the template or the tag writes it) + answer."""
    reasoning = (example.get("reasoning") or "").strip()
    if not reasoning:
        return example["output"]
    if parts is not None:
        return parts[0] + reasoning + parts[1] + example["output"]
    return with_reasoning(example["output"], reasoning, tag) if mode == "include" else example["output"]


def attach_extras(cfg: Config, rows: list[dict]) -> list[dict]:
    """Rows of the Alpaca files with what its five fields cannot hold, from examples.jsonl: the
    teacher's reasoning, and a follow-up's earlier turns (tasks.follow_ups)."""
    if not cfg.examples_path.exists():
        return rows
    found = {(e["instruction"], e["input"], e["output"]): {k: e[k] for k in ("reasoning", "history") if e.get(k)}
             for e in read_jsonl(cfg.examples_path) if e.get("reasoning") or e.get("history")}
    if not found:
        return rows
    return [{**r, **found.get((r["instruction"], r["input"], r["output"]), {})} for r in rows]


def reasoning_tag(tok, system_prompt: str | None, configured: str) -> str:
    """The tag a student's reasoning comes in: its template's own (Qwen3: think), else train.reasoning_tag."""
    parts = template_reasoning(tok, system_prompt)
    found = re.search(r"<([A-Za-z_][\w-]*)>", parts[0]) if parts else None
    return found.group(1) if found else configured


def strip_reasoning(text: str, tag: str = "think") -> str:
    """The final answer of a generation: what follows its </tag> (the opening tag may sit in the
    prompt, as in R1-distilled templates); a reasoning cut off before </tag> leaves no answer."""
    close = f"</{tag}>"
    if close in text:
        return text.split(close, 1)[1].strip()
    return "" if text.lstrip().startswith(f"<{tag}>") else text
