"""The records that pass between stages, one JSON object a line on disk (or a row of the store)."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict


class Chunk(TypedDict):
    """A line of chunks.jsonl."""

    chunk_id: int
    source: str  # file path, with #L<n> for a .jsonl record
    start: int  # character offsets into the normalised document
    end: int
    lang: str  # zh | en
    text: str


class Task(TypedDict):
    """A line of tasks.jsonl: a teacher request to make, or (source text) a finished example."""

    task_id: str
    chunk_id: int
    kind: str  # qa, article, a tasks.custom kind, or text_continuation
    lang: str
    category: Literal["问答", "文章生成"]
    source: Literal["teacher", "text"]
    instruction: str
    input: str
    parse: NotRequired[Literal["text", "json_qa"]]  # teacher tasks
    output: NotRequired[str]  # text tasks: the real passage that follows the input


class StoredAnswer(TypedDict):
    """A teacher answer as `Store.get` returns it."""

    content: str
    finish_reason: str
    flags: list[str]  # truncated, empty, refusal
    usage: dict
    cost: float | None
    logprobs: bytes | None  # shifu.logprobs.pack_logprobs
    reasoning: NotRequired[str]  # a thinking teacher's reasoning; "" when none


class Example(TypedDict):
    """A line of work_dir/examples.jsonl; the dataset files keep the first five fields."""

    instruction: str
    input: str
    output: str
    chunk_id: int
    category: Literal["问答", "文章生成"]
    kind: str
    key: str | None  # the stored answer it came from; None for examples from the text itself
    reasoning: NotRequired[str]  # the teacher's reasoning before this output (teacher.thinking)
    history: NotRequired[list[dict]]  # a follow-up's earlier turns: [{"user", "assistant"}] (tasks.follow_ups)
    split: NotRequired[Literal["train", "eval"]]
