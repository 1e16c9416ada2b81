"""Evaluation speed: shifu.evaluate's batched generation and teacher-forced scoring against one
example at a time, on the real demo student (Qwen2.5-Coder-0.5B-Instruct, from `make demo-models`).

    python bench/eval_throughput.py                       # writes its section of docs/BENCHMARKS.md
    python bench/eval_throughput.py --model DIR --prompts 8 --new-tokens 32 --batches 1,4,8

Prompts are closed-book questions and continuations cut from data/sample_zh.txt; generation is
greedy, so the batched answers should equal the one-at-a-time ones (how many do is reported: left
padding may move a near-tie between two tokens). Device and dtype come from shifu.device's rule.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_section

QUESTIONS = ["孔乙己是谁？", "咸亨酒店的格局是怎样的？", "孔乙己为什么被人取笑？", "“窃书不能算偷”是谁说的？",
             "孔乙己最后怎样了？", "掌柜为什么记得孔乙己？", "鲁镇的酒店里做工的人怎么喝酒？", "“多乎哉？不多也。”是什么意思？"]


def prompts(n: int) -> list[str]:
    text = (ROOT / "data" / "sample_zh.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n") if len(p.strip()) > 60]
    out = []
    for k in range(n):
        out.append(QUESTIONS[k // 2 % len(QUESTIONS)] if k % 2 == 0 else
                   "请用与下面这段文字相同的文风续写。\n\n" + paragraphs[k % len(paragraphs)][:200])
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.expanduser("~/.cache/shifu/hf/qwen0.5b"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()

    import torch

    from shifu.device import placement
    from shifu.encode import encode_examples
    from shifu.evaluate import generate, score
    from shifu.models import load_causal_lm, load_tokenizer

    where = placement("auto")
    tok = load_tokenizer(a.model)
    model = load_causal_lm(a.model, dtype=where.dtype).to(where.device).eval()
    texts = prompts(a.prompts)
    sizes = [int(b) for b in a.batches.split(",")]
    rows, reference = [], None
    for b in sizes:
        answers, seconds = timed(lambda b=b: generate(model, tok, texts, a.new_tokens, None, b, where.device))
        reference = reference or answers
        same = sum(x == y for x, y in zip(answers, reference))
        rows.append(("generate", b, seconds, len(texts) * a.new_tokens / seconds, f"{same}/{len(texts)}"))
        print(rows[-1], flush=True)
    examples = [{"instruction": t, "input": "", "output": r} for t, r in zip(texts, reference)]
    enc = encode_examples(tok, examples, 512)
    answer_tokens = int(sum(len(x) - s for x, s in zip(enc.input_ids, enc.answer_start)))
    base = None
    for b in sizes:
        out, seconds = timed(lambda b=b: score(model, enc, None, tok.pad_token_id, b, where.device))
        base = out if base is None else base
        diff = float(abs(out[:, 0] - base[:, 0]).max() / max(abs(base[:, 0]).max(), 1e-9))
        rows.append(("score", b, seconds, sum(len(x) for x in enc.input_ids) / seconds, f"rel. CE diff {diff:.1e}"))
        print(rows[-1], flush=True)
    command = "python bench/eval_throughput.py " + " ".join(sys.argv[1:])
    table = "\n".join(f"| {kind} | {b} | {s:.1f} | {rate:.1f} | {check} |" for kind, b, s, rate, check in rows)
    seq = {kind: s for kind, b, s, *_ in rows if b == 1}
    best = {kind: min(s for k, b, s, *_ in rows if k == kind) for kind in ("generate", "score")}
    text = (f"## Evaluation speed: batched vs one at a time (`bench/eval_throughput.py`)\n\n"
            f"Student {Path(a.model).name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) "
            f"on {where.device}, {str(where.dtype).replace('torch.', '')}; {len(texts)} prompts "
            f"(closed-book questions and continuations from data/sample_zh.txt), {a.new_tokens} new tokens each, "
            f"greedy; scoring {len(enc)} examples ({answer_tokens} answer tokens) teacher-forced.\n\n"
            f"Machine: {machine('torch', 'transformers')}.\nCommand: `{command.strip()}`\n\n"
            "| what | batch | seconds | tokens/s (generate: new-token budget; score: all tokens) | check against batch 1 |\n"
            "| --- | --- | --- | --- | --- |\n" + table + "\n\n"
            + (f"Best batch vs one at a time: generation {seq['generate'] / best['generate']:.1f}x, "
               f"scoring {seq['score'] / best['score']:.1f}x faster. " if 1 in sizes else "")
            + "On a CPU the work is bound by arithmetic, so a batch saves little and its padding costs some; on "
            "a GPU, where one decoding step is bound by reading the weights, a batch of 16 should cost little "
            "more than one prompt. Load average above 2 means the cores were shared with other jobs.\n")
    print(text)
    if not a.no_write:
        write_section("eval_throughput", text)
    del torch


if __name__ == "__main__":
    main()
