"""How close the student's answers are to the teacher's: ROUGE-L and BLEU, per example.

    rouge_l(hyp, ref, "zh"), bleu(hyp, ref, "zh")       # 0..100
    overlap_scores(samples)                            # base and trained vs teacher, with intervals

ROUGE-L comes from rouge-score on characters for Chinese (its own tokenizer keeps only ASCII
letters and digits, which would drop every Chinese character) and on its words for English.
BLEU is sacrebleu's, with its `zh` tokenizer for Chinese and `13a` otherwise: per example
(exponential smoothing, so short answers do not score a hard zero) for the paired interval, and over
the corpus for the headline figure that other papers report.
"""

from __future__ import annotations

from functools import lru_cache

from shifu.stats import paired_change


class _Chars:
    """rouge-score tokenizer: every non-space character is a token."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


@lru_cache(maxsize=2)
def _scorer(lang: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Chars() if lang == "zh" else None)


def rouge_l(hyp: str, ref: str, lang: str) -> float:
    return 100 * _scorer("zh" if lang == "zh" else "en").score(ref, hyp)["rougeL"].fmeasure


def _bleu_tokenizer(lang: str) -> str:
    return "zh" if lang == "zh" else "13a"


def bleu(hyp: str, ref: str, lang: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(hyp, [ref], tokenize=_bleu_tokenizer(lang)).score


def corpus_bleu(hyps: list[str], refs: list[str], lang: str) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(hyps, [refs], tokenize=_bleu_tokenizer(lang)).score


def overlap_scores(samples: list[dict], boot: int = 1000, seed: int = 0) -> dict:
    """Samples hold base, trained, teacher and lang. Per metric: base -> trained vs the teacher."""
    if not samples:
        return {}
    out = {}
    for name, metric in (("rouge_l", rouge_l), ("bleu", bleu)):
        before = [metric(s["base"], s["teacher"], s["lang"]) for s in samples]
        after = [metric(s["trained"], s["teacher"], s["lang"]) for s in samples]
        out[name] = paired_change(before, after, samples=boot, seed=seed)
    langs = sorted({s["lang"] for s in samples})
    out["corpus_bleu"] = {lang: {side: corpus_bleu([s[side] for s in samples if s["lang"] == lang],
                                                   [s["teacher"] for s in samples if s["lang"] == lang], lang)
                                 for side in ("base", "trained")} for lang in langs}
    return out
