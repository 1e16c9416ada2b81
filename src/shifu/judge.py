"""A judge model compares two answers to the same prompt, in both orders, against the source passage.

    pairs = [Pair(id="base:0", passage=..., prompt=..., category="问答", lang="zh", first=trained, second=base)]
    outcomes, stats = judge_pairs(cfg, pairs)     # "win" / "tie" / "loss" / "unparseable" for `first`

The judge is the teacher (or `eval.judge_model` on `eval.judge_base_url`), asked at temperature 0
through the teacher's own client, runner and store: retries, concurrency, the budget, and no
request bought twice (verdicts live in <work_dir>/eval/judge.sqlite, so a rerun of `shifu eval`
pays nothing for verdicts it already has). Each pair is asked twice, with the answers swapped,
because judges favour a position. The two verdicts, seen from `first`, are added (+1 win, 0 tie,
-1 loss): a win in one order and a loss in the other is a tie, and so are two identical answers
(never sent). A verdict that is not exactly one kind of marker is unparseable, and so is its
pair: counted as such, never guessed.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from shifu.config import Config, TeacherConfig
from shifu.teacher import Request, estimate_tokens

RUBRIC = {
    "zh": {"问答": "哪个回答根据原文更正确、更完整？与原文矛盾或编造的内容是严重错误。",
           "文章生成": "哪个续写更忠实于原文的文风（用词、语气、叙述方式），并且更连贯、不重复原文？"},
    "en": {"问答": "Which answer is more correct and complete with respect to the passage? Contradicting the "
                 "passage or inventing facts is a serious error.",
           "文章生成": "Which continuation is more faithful to the passage's style (wording, tone, narration) "
                   "and more coherent, without repeating the passage?"},
}
CLOSED_BOOK = {"zh": "（回答者没有看到原文，只看到了问题。）",
               "en": "(The answerers did not see the passage, only the question.)"}
IN_TASK = {"zh": "（原文就在下面的任务里。）", "en": "(The passage is part of the task below.)"}
TEMPLATE = {
    "zh": ("你是严格公正的评审。下面是一段原文、一个任务和两个回答。\n\n【原文】\n{passage}\n\n【任务】{note}\n{prompt}\n\n"
           "【评判标准】{rubric} 不要因为回答更长而偏向它。\n\n【回答 A】\n{a}\n\n【回答 B】\n{b}\n\n"
           "只输出一个标记，不要输出其他内容：A 更好输出 [[A]]，B 更好输出 [[B]]，一样好或一样差输出 [[C]]。"),
    "en": ("You are a strict, impartial judge. Below are a passage, a task and two answers.\n\n[Passage]\n{passage}\n\n"
           "[Task]{note}\n{prompt}\n\n[Criterion] {rubric} Do not favour an answer for being longer.\n\n"
           "[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
           "Output one marker and nothing else: [[A]] if A is better, [[B]] if B is better, [[C]] for a tie."),
}
MARKER = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
SCORE = {"first": 1, "tie": 0, "second": -1}


@dataclass(frozen=True)
class Pair:
    id: str
    passage: str
    prompt: str
    category: str
    lang: str
    first: str
    second: str
    closed_book: bool = False


def judge_store_path(cfg: Config):
    # Not teacher.sqlite: the dataset and train stages fingerprint that store, and verdicts must not
    # make them stale. The same Store class, so verdicts survive a kill and are never bought twice.
    return cfg.eval_dir / "judge.sqlite"


def judge_teacher(cfg: Config) -> TeacherConfig:
    """The teacher's settings with the judge's server and model, deterministic and short."""
    e = cfg.eval
    return cfg.teacher.model_copy(update={
        "model": e.judge_model or cfg.teacher.model, "base_url": e.judge_base_url or cfg.teacher.base_url,
        "temperature": 0.0, "top_p": None, "max_tokens": e.judge_max_tokens, "top_logprobs": 0,
        "thinking": False})  # a verdict of one marker: a thinking judge would spend max_tokens thinking


def check_judge(cfg: Config) -> None:
    """Fail before the student is loaded, not after it has answered: a missing key is one line."""
    from shifu.errors import UserError
    from shifu.teacher import make_client

    try:
        make_client(judge_teacher(cfg))
    except UserError as err:
        raise type(err)(f"judge: {err} (or set eval.judge: false to evaluate without one)") from None


def judge_prompt(pair: Pair, swapped: bool) -> str:
    lang = pair.lang if pair.lang in TEMPLATE else "en"
    rubric = RUBRIC[lang].get(pair.category, RUBRIC[lang]["问答"])
    a, b = (pair.second, pair.first) if swapped else (pair.first, pair.second)
    note = CLOSED_BOOK[lang] if pair.closed_book else ""
    # An open-book prompt already holds the passage: once is enough, and halves the judge's input.
    passage = IN_TASK[lang] if pair.passage and pair.passage in pair.prompt else pair.passage
    return TEMPLATE[lang].format(passage=passage, prompt=pair.prompt, rubric=rubric, note=note,
                                 a=a.strip() or "（空）", b=b.strip() or "（空）")


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'tie' from the judge's answer; None unless exactly one kind of marker appears."""
    found = {m.upper() for m in MARKER.findall(text or "")}
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


def from_first(verdict: str | None, swapped: bool) -> str | None:
    """A verdict on positions A/B, seen from the pair's first answer."""
    if verdict in (None, "tie"):
        return verdict
    return "first" if (verdict == "A") != swapped else "second"


def combine(straight: str | None, swapped: str | None) -> str:
    """Both orders' verdicts (on positions) -> the outcome for the first answer."""
    views = [from_first(straight, False), from_first(swapped, True)]
    if None in views:
        return "unparseable"
    total = sum(SCORE[v] for v in views)
    return "win" if total > 0 else "loss" if total < 0 else "tie"


def requests_for(cfg: Config, pairs: list[Pair]) -> list[tuple[Request, Request]]:
    tc = judge_teacher(cfg)
    return [(Request.build(tc, judge_prompt(p, False), logprobs=False),
             Request.build(tc, judge_prompt(p, True), logprobs=False)) for p in pairs]


async def _ask(cfg: Config, reqs: list[Request]) -> tuple[dict[str, str], dict]:
    from shifu.store import Store
    from shifu.teach import Runner
    from shifu.teacher import make_client

    jcfg = cfg.model_copy(update={"teacher": judge_teacher(cfg)})
    store = Store(judge_store_path(cfg))
    answers: dict[str, str] = {}
    try:
        async with make_client(jcfg.teacher) as client:
            runner = Runner(jcfg, client, store)
            for r in reqs:
                runner.add(r, lambda stored, key=r.key: answers.__setitem__(key, stored["content"]))
            s = await runner.run()
    finally:
        store.close()
    return answers, {"requests": s.planned, "sent": s.done, "cached": s.cached, "failed": s.failed,
                     "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                     "cost": round(s.cost, 6), "model": jcfg.teacher.model}


def judge_pairs(cfg: Config, pairs: list[Pair]) -> tuple[list[dict], dict]:
    """One record per pair (both raw verdicts and the outcome for `first`), and the calls' figures."""
    if not pairs:
        return [], {"requests": 0, "cost": 0.0}
    asked = [p for p in pairs if not identical(p)]
    reqs = requests_for(cfg, asked)
    answers, calls = asyncio.run(_ask(cfg, [r for two in reqs for r in two]))
    pending = iter(reqs)
    calls["identical_pairs"] = len(pairs) - len(asked)
    records = []
    for pair in pairs:
        if identical(pair):  # the same text twice: a tie, and nothing to pay for
            records.append({"id": pair.id, "category": pair.category, "straight": "tie", "swapped": "tie",
                            "outcome": "tie", "identical": True})
            continue
        straight, swapped = next(pending)
        v1, v2 = parse_verdict(answers.get(straight.key)), parse_verdict(answers.get(swapped.key))
        records.append({"id": pair.id, "category": pair.category, "straight": v1, "swapped": v2,
                        "outcome": combine(v1, v2)})
    return records, calls


def identical(pair: Pair) -> bool:
    return pair.first.strip() == pair.second.strip()


def judge_estimate(cfg: Config) -> dict:
    """Requests, tokens and the most they can cost, for the judge of one `shifu eval`."""
    from shifu.limits import price_of

    if not cfg.eval.judge:
        return {"judge_requests": 0}
    from shifu.eval_plan import eval_sizes

    sizes, tc = eval_sizes(cfg), judge_teacher(cfg)
    pairs = 2 * sizes["judged"] + sizes["knowledge"]  # vs base and vs teacher; knowledge vs base
    overhead = estimate_tokens(TEMPLATE["zh"] + RUBRIC["zh"]["问答"]) + 40  # the task's instruction
    # The passage appears once (open-book prompts hold it, and then the passage block does not).
    per_request = overhead + sizes["passage_tokens"] + 2 * cfg.eval.max_new_tokens
    requests = 2 * pairs
    usage = {"prompt_tokens": int(requests * per_request), "completion_tokens": requests * tc.max_tokens}
    price = tc.prices.get(tc.model) if tc.kind == "openai" else None
    return {"judge_model": tc.model, "judge_requests": requests, "judge_input_tokens": usage["prompt_tokens"],
            "judge_max_output_tokens": usage["completion_tokens"],
            "judge_max_cost": price_of(usage, price, tc.peak_pricing, when=PEAK) if price
            else f"no price for {tc.model} in teacher.prices"}


PEAK = 1767578400.0  # Monday 2026-01-05 02:00 UTC, inside DeepSeek's peak hours: the upper bound
