"""A multi-turn example (tasks.follow_ups) as token ids: every assistant turn is labelled, the user
turns and the template's text between turns are not.

    ids, answer_start, masked, truncated = encode_conversation(tok, None, [(q1, a1), (q2, a2)], 512)

`answer_start` is the first labelled token (the first answer), as for single-turn examples;
`masked` lists the [start, end) spans after it that carry no label (the second user turn).
The template's own text around the turns is found by rendering it once around markers, so any
chat template works; each answer keeps its end-of-turn token, as shifu.encode does.
A conversation longer than max_length loses its end.
"""

from __future__ import annotations

import re

import numpy as np

from shifu.models import end_token_ids

_USER, _ANSWER = "\x00SHIFU_U{}\x00", "\x00SHIFU_A{}\x00"


def template_glue(tok, system_prompt: str | None, n: int) -> list[str]:
    """The template's text before, between and after n user/assistant turns: 2n + 1 pieces."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i in range(n):
        messages += [{"role": "user", "content": _USER.format(i)}, {"role": "assistant", "content": _ANSWER.format(i)}]
    pieces = re.split("\x00SHIFU_[UA]\\d+\x00", tok.apply_chat_template(messages, tokenize=False))
    assert len(pieces) == 2 * n + 1, "the chat template dropped a turn"
    return pieces


def encode_conversation(tok, system_prompt: str | None, turns: list[tuple[str, str]],
                        max_length: int) -> tuple[np.ndarray, int, list[tuple[int, int]], bool]:
    pieces = template_glue(tok, system_prompt, len(turns))
    ends = set(end_token_ids(tok))
    ids: list[int] = []
    labelled: list[bool] = []

    def put(text_or_ids, label: bool) -> None:
        new = tok(text_or_ids, add_special_tokens=False)["input_ids"] if isinstance(text_or_ids, str) else text_or_ids
        ids.extend(new)
        labelled.extend([label] * len(new))

    put(pieces[0], False)
    for i, (user, answer) in enumerate(turns):
        put(user, False)
        put(pieces[2 * i + 1], False)
        put(answer, True)
        after = tok(pieces[2 * i + 2], add_special_tokens=False)["input_ids"] if pieces[2 * i + 2] else []
        cut = next((j + 1 for j, t in enumerate(after) if t in ends), 0)
        put(after[:cut] or ([tok.eos_token_id] if not after else []), True)  # the end-of-turn token is learnt
        if i + 1 < len(turns):
            put(after[cut:], False)  # the newline after it, and the next user turn's opening, are not
    truncated = len(ids) > max_length
    ids, labelled = ids[:max_length], labelled[:max_length]
    start = labelled.index(True) if True in labelled else len(ids)
    masked, open_at = [], None
    for j in range(start, len(ids) + 1):
        off = j < len(ids) and not labelled[j]
        if off and open_at is None:
            open_at = j
        elif not off and open_at is not None:
            masked.append((open_at, j))
            open_at = None
    return np.asarray(ids, np.int32), start, masked, truncated
