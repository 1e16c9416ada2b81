"""Duplicate detection and language tagging (shifu.dedup)."""

from __future__ import annotations

import random

from conftest import EN, MIXED, TRAD, ZH

from shifu.dedup import Deduper, language, signatures

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


def test_signatures_do_not_depend_on_the_batch_and_every_bucket_is_filled():
    """Batches of about 64K characters, densified per row: a text's signature is its own."""
    rng = random.Random(11)
    texts = [ZH[rng.randrange(len(ZH) - 600):][:rng.randint(5, 600)] for _ in range(300)] + ["x" * 70000, "ab", ""]
    together = signatures(texts)
    alone = [signatures([t])[0] for t in texts]
    assert all((row == one).all() for row, one in zip(together, alone))
    assert (together < (1 << 26) + 64).all()  # no bucket left empty (0xFFFFFFFF)
