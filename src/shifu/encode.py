"""Examples -> token ids with the student's chat template, once, cached on disk.

    encoded = encode_examples(tok, examples, max_length=512)
    encoded.input_ids[i], encoded.answer_start[i]

The prompt is the chat template around the user message; the answer is the teacher's text plus
the template's end-of-turn token (<|im_end|> for Qwen), the only tokens that count in the loss.
Too long? The middle of the user message goes first (its start holds the instruction, its end the
question or the passage to continue); the answer keeps at least half of max_length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shifu.files import atomic_path, build_lock, hash_obj
from shifu.models import end_token_ids
from shifu.tasks import format_prompt

_USER, _ANSWER = "\x00SHIFU_USER\x00", "\x00SHIFU_ANSWER\x00"


@dataclass
class Encoded:
    input_ids: list[np.ndarray]
    answer_start: np.ndarray  # index of the first answer token in each example
    truncated: int = 0
    masked: list[list[tuple[int, int]]] | None = None  # unlabelled spans after answer_start (a follow-up's user turn)

    def __len__(self) -> int:
        return len(self.input_ids)


def template_parts(tok, system_prompt: str | None) -> tuple[list[int], list[int], list[int]]:
    """Token ids before the user message, between it and the answer, and after the answer (labelled)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    text = tok.apply_chat_template(system + [{"role": "user", "content": _USER}], tokenize=False,
                                   add_generation_prompt=True)
    head, tail = text.split(_USER)
    full = tok.apply_chat_template(system + [{"role": "user", "content": "u"},
                                            {"role": "assistant", "content": _ANSWER}], tokenize=False)
    after = full.split(_ANSWER)[1]
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    end = ids(after)
    ends = set(end_token_ids(tok))
    # Keep the end-of-turn token; the newline some templates put after it is not predicted.
    cut = next((i + 1 for i, t in enumerate(end) if t in ends), len(end))
    if not end:
        end = [tok.eos_token_id]
        cut = 1
    return ids(head), ids(tail), end[:cut]


def encode_one(tok, parts, instruction: str, input_: str, output: str, max_length: int) -> tuple[np.ndarray, int, bool]:
    head, tail, end = parts
    user = tok(format_prompt(instruction, input_), add_special_tokens=False)["input_ids"]
    answer = tok(output, add_special_tokens=False)["input_ids"] + end
    fixed = len(head) + len(tail)
    answer = answer[:max(max_length - fixed - min(len(user), 32), max_length // 2)]
    room = max_length - fixed - len(answer)
    truncated = len(user) > room
    if truncated:
        keep_front = min(room // 2, 64)
        user = user[:keep_front] + user[len(user) - (room - keep_front):] if room > keep_front else user[:max(room, 0)]
    ids = head + user + tail
    return np.asarray(ids + answer, dtype=np.int32), len(ids), truncated


def encode_examples(tok, examples: list[dict], max_length: int, system_prompt: str | None = None,
                    cache_dir: Path | None = None, reasoning: tuple[str, str] = ("include", "think")) -> Encoded:
    """Encoded examples; with `cache_dir`, built once (by the first of several ranks to get there,
    the others wait under build_lock) and read back by every later call. An example's `reasoning`
    goes before its answer as shifu.reasoning.target_text says; `reasoning` = (train.reasoning, train.reasoning_tag)."""
    if cache_dir is None:
        return _encode(tok, examples, max_length, system_prompt, reasoning)
    thoughts = [e["reasoning"] for e in examples if e.get("reasoning")]
    key = hash_obj([tok.name_or_path, len(tok), tok.chat_template, max_length, system_prompt,
                    [(e["instruction"], e["input"], e["output"], *([e["reasoning"]] if e.get("reasoning") else []),
                      *([e["history"]] if e.get("history") else [])) for e in examples],
                    *([list(reasoning)] if thoughts else [])])
    path = Path(cache_dir) / f"encoded-{key[:16]}.npz"
    with build_lock(path):
        if path.exists():
            return _load(path)
        enc = _encode(tok, examples, max_length, system_prompt, reasoning)
        _save(enc, path)
        return enc


def _encode(tok, examples: list[dict], max_length: int, system_prompt: str | None,
            reasoning: tuple[str, str] = ("include", "think")) -> Encoded:
    from shifu.reasoning import target_text, template_reasoning

    parts = template_parts(tok, system_prompt)
    thinks = template_reasoning(tok, system_prompt) if any(e.get("reasoning") for e in examples) else None
    rows = [_conversation(tok, system_prompt, e, thinks, reasoning, max_length) if e.get("history") else
            (*encode_one(tok, parts, e["instruction"], e["input"], target_text(e, thinks, *reasoning), max_length), [])
            for e in examples]
    masked = [r[3] for r in rows]
    return Encoded([r[0] for r in rows], np.asarray([r[1] for r in rows], np.int64), sum(r[2] for r in rows),
                   masked if any(masked) else None)


def _conversation(tok, system_prompt, e: dict, thinks, reasoning, max_length: int):
    """A follow-up with its earlier turns; its reasoning goes in only where no template writes it."""
    from shifu.conversation import encode_conversation
    from shifu.reasoning import target_text

    last = target_text(e, None, *reasoning) if thinks is None else e["output"]
    turns = [(t["user"], t["assistant"]) for t in e["history"]] + [(format_prompt(e["instruction"], e["input"]), last)]
    ids, start, masked, truncated = encode_conversation(tok, system_prompt, turns, max_length)
    return ids, start, truncated, masked


def _load(path: Path) -> Encoded:
    z = np.load(path)
    flat, offsets = z["flat"], z["offsets"]
    ids = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    masked = None
    if "masked" in z.files and len(z["masked"]):
        masked = [[] for _ in ids]
        for i, a, b in z["masked"].tolist():
            masked[i].append((a, b))
    return Encoded(ids, z["answer_start"], int(z["truncated"]), masked)


def _save(enc: Encoded, path: Path) -> None:
    offsets = np.cumsum([0] + [len(r) for r in enc.input_ids])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, flat=np.concatenate(enc.input_ids) if len(enc) else np.zeros(0, np.int32),
                 offsets=offsets, answer_start=enc.answer_start, truncated=enc.truncated,
                 masked=np.asarray([(i, a, b) for i, spans in enumerate(enc.masked or []) for a, b in spans],
                                   np.int64).reshape(-1, 3))
