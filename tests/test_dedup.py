"""Duplicate detection and language tagging (shifu.dedup)."""

from __future__ import annotations

import random

from shifu.dedup import Deduper, language, signatures

from conftest import SAMPLE_EN, SAMPLE_ZH

ZH = SAMPLE_ZH.read_text(encoding="utf-8")
EN = SAMPLE_EN.read_text(encoding="utf-8")
TRAD = ("魯鎮的酒店的格局，是和別處不同的：都是當街一個曲尺形的大櫃檯，櫃裡面預備著熱水，可以隨時溫酒。"
        "做工的人，傍午傍晚散了工，每每花四文銅錢，買一碗酒，——這是二十多年前的事，現在每碗要漲到十文，——靠櫃外站著，熱熱的喝了休息。"
        "孔乙己是站著喝酒而穿長衫的唯一的人。他身材很高大；青白臉色，皺紋間時常夾些傷痕；一部亂蓬蓬的花白的鬍子。"
        "他對人說話，總是滿口之乎者也，教人半懂不懂的。「讀書人的事，能算偷麼？」接連便是難懂的話，什麼「君子固窮」，什麼「者乎」之類。\n\n") * 6
MIXED = "".join(
    f"第{i}次实验里，我们用 PyTorch 2.{i} 训练了一个 0.5B 的 student model。The loss went down to 1.{i} after "
    f"{i * 10} steps, which is good! 但是 eval 的 perplexity 还是很高，原因不明？“需要更多数据。”他说。\n"
    for i in range(40))


# ---- language -----------------------------------------------------------------------------------

def test_language_of_chinese_english_mixed_and_traditional():
    assert language(ZH[:300]) == "zh" and language(TRAD[:300]) == "zh" and language(MIXED[:300]) == "zh"
    assert language(EN[:300]) == "en" and language("") == "en" and language("1234 ……") == "en"


# ---- duplicates ---------------------------------------------------------------------------------

def _hanzi(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(n))


def test_minhash_estimates_jaccard_of_5grams():
    rng = random.Random(7)
    for shared in (100, 300, 500):
        a = _hanzi(rng, 600)
        b = a[:shared] + _hanzi(rng, 600 - shared)
        grams = lambda s: {s[i:i + 5] for i in range(len(s) - 4)}  # noqa: E731
        truth = len(grams(a) & grams(b)) / len(grams(a) | grams(b))
        sig = signatures([a, b])
        assert abs((sig[0] == sig[1]).mean() - truth) < 0.15


def test_deduper_drops_exact_and_near_copies_and_counts_them():
    rng = random.Random(1)
    a, b, c = _hanzi(rng, 400), _hanzi(rng, 400), _hanzi(rng, 400)
    near = a[:200] + "变" + a[201:]
    spaced = " ".join(b[i:i + 40] for i in range(0, 400, 40))  # same text, other whitespace
    dedup = Deduper(0.85)
    assert dedup.keep([a, b, a, near, c, spaced]) == [True, True, False, False, True, False]
    assert (dedup.exact_dups, dedup.near_dups) == (1, 2)
    exact_only = Deduper(1.0)
    assert exact_only.keep([a, near, a]) == [True, True, False]
    assert dedup.is_duplicate(c) and not dedup.is_duplicate(_hanzi(rng, 400))


def test_short_texts_are_compared_whole():
    dedup = Deduper(0.85)
    assert dedup.keep(["好", "好", "坏", "", " ", "abcd", "abce"]) == [True, False, True, True, False, True, True]
