"""Chunking: limits, sentences kept whole, offsets back into the source, overlap, and duplicates."""

from __future__ import annotations

import bisect
import json
import random
import re

import pytest
from conftest import EN, MIXED, SAMPLE_ZH, TRAD, ZH

from shifu.chunk import LEVELS, SENTENCE_END, Tokens, _quote, chunk_blocks, run_chunk, split_text
from shifu.dedup import Deduper
from shifu.errors import UserError
from shifu.read import normalise, read_blocks

NO_PUNCT_ZH = re.sub(r"[^\u4e00-\u9fff]", "", ZH)
NO_PUNCT_EN = re.sub(r"[^A-Za-z ]", "", EN.replace("\n", " "))

_CLOSERS = "”’」』）)》】\"'"
SENTENCE = re.compile(rf"(?:[。！？]|…)+[{_CLOSERS}]*|[.!?]+[{_CLOSERS}]*(?=\s|$|[\u4e00-\u9fff])|\n[ \t]*\n")
OPENERS, CLOSING = "“‘「『（《【", "”’」』）》】"


def sentence_spans(text: str):
    """(start, end, end with the whitespace after it) of each sentence (or paragraph end): what must
    not be split when it fits, whitespace and all, into a chunk."""
    bounds = sorted({0, len(text), *(m.end() for m in SENTENCE.finditer(text))})
    starts = [a + len(text[a:b]) - len(text[a:b].lstrip()) for a, b in zip(bounds, bounds[1:])]
    for (a, b), start, after in zip(zip(bounds, bounds[1:]), starts, starts[1:] + [len(text)]):
        end = a + len(text[a:b].rstrip())
        if end > start:
            yield start, end, after


def check_chunks(text: str, spans, size: int, count=len) -> None:
    """Every property a split must have, without overlap."""
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "chunks must tile the text"
    assert "".join(text[a:b] for a, b in spans) == text
    sizes = [count(text[a:b]) for a, b in spans]
    assert max(sizes) <= size, f"a chunk measures {max(sizes)} > {size}"
    cuts = sorted(a for a, _ in spans[1:])
    for a, b, after in sentence_spans(text):
        if count(text[a:after]) <= size:
            k = bisect.bisect_right(cuts, a)
            assert k == len(cuts) or cuts[k] >= b, f"sentence split: {text[a:b]!r} at {cuts[k] - a}"
    for a, b in spans:
        chunk = text[a:b].strip()
        assert chunk[:1] not in CLOSING, f"chunk starts with a closing quote: {chunk[:20]!r}"
        assert chunk[-1:] not in OPENERS, f"chunk ends with an opening quote: {chunk[-20:]!r}"


# ---- the splitter, on every kind of text ---------------------------------------------------------

@pytest.mark.parametrize("name,text", [("zh", ZH), ("en", EN), ("mixed", MIXED), ("traditional", TRAD)])
@pytest.mark.parametrize("size", [80, 300, 1000])
def test_chunks_fit_tile_the_text_and_keep_sentences_whole(name, text, size):
    spans = split_text(text, size)
    check_chunks(text, spans, size)
    if len(text) > size:  # and pack well: chunks are not needlessly small
        assert sum(b - a for a, b in spans) / len(spans) > size / 2


def test_a_line_break_inside_a_sentence_is_no_place_to_cut():
    # Gutenberg text is wrapped at 70 columns: its line breaks are spaces, not boundaries.
    for a, b in split_text(EN, 300)[:-1]:
        chunk = EN[a:b]
        assert chunk.rstrip()[-1] in ".!?”’\"'),;:" or "\n\n" in chunk[len(chunk.rstrip()):], repr(chunk[-40:])


@pytest.mark.parametrize("text", [NO_PUNCT_ZH, NO_PUNCT_EN, "中文English" * 300, "e\u0301te\u0301" * 800])
def test_text_without_punctuation_never_splits_a_word_or_a_combining_mark(text):
    spans = split_text(text, 120)
    check_chunks(text, spans, 120)
    for a, _ in spans[1:]:
        left, right = text[a - 1], text[a]
        assert not (left.isascii() and left.isalnum() and right.isascii() and right.isalnum()), f"cut in a word at {a}"
        assert right != "\u0301"


def test_a_sentence_longer_than_the_limit_is_split_at_clauses_then_words():
    zh = "他" + "，".join(f"走过第{i}条长长的街道" for i in range(60)) + "。"
    spans = split_text(zh, 100)
    check_chunks(zh, spans, 100)
    assert all(zh[a:b].endswith("，") for a, b in spans[:-1])
    en = "The rabbit " + " ".join(f"ran past house number {i}" for i in range(60)) + "."
    spans = split_text(en, 100)
    check_chunks(en, spans, 100)
    assert all(en[b - 1] == " " for a, b in spans[:-1])


def test_a_lone_title_is_not_a_chunk():
    text = "第一章\n\n" + "".join(f"这是第{i:02d}句话，它说了一件事情。" for i in range(30))
    first = split_text(text, 300)[0]
    assert text[first[0]:first[1]].startswith("第一章") and first[1] - first[0] > 150


def test_a_five_megabyte_single_line():
    line = ZH.replace("\n", "") * (5_000_000 // len(ZH.replace("\n", "").encode("utf-8")))
    spans = split_text(line, 500)
    check_chunks(line, spans, 500)
    bare = NO_PUNCT_ZH * (5_000_000 // len(NO_PUNCT_ZH.encode("utf-8")))
    spans = split_text(bare, 500)
    assert [b - a for a, b in spans[:-1]] == [500] * (len(spans) - 1) and spans[-1][1] == len(bare)


def test_a_custom_measure_is_respected():
    words = lambda s: len(s.split())  # noqa: E731
    spans = split_text(EN, 40, words)
    check_chunks(EN, spans, 40, words)


@pytest.fixture(scope="module")
def tokenizer(tiny_student):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_student)


class CountingTokens(Tokens):
    calls = texts = 0

    def _count(self, texts):
        self.calls += 1
        self.texts += len(texts)
        return super()._count(texts)


@pytest.mark.parametrize("name,text", [("zh", ZH), ("en", EN), ("mixed", MIXED), ("traditional", TRAD)])
def test_token_limit_holds_with_batched_counting(tokenizer, name, text):
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    measure = CountingTokens(tokenizer)
    spans = split_text(text, 64, measure)
    check_chunks(text, spans, 64, count)
    # Pieces are counted in batches: a handful of calls, not one per piece (nor even one per chunk).
    assert measure.calls * 4 <= measure.texts and measure.calls < len(spans), (measure.calls, measure.texts)


# ---- overlap ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [ZH, EN, MIXED])
def test_overlap_repeats_a_bounded_tail_from_a_boundary_and_keeps_the_limit(text):
    spans = split_text(text, 200, overlap=50)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(b - a <= 200 for a, b in spans)
    overlaps = []
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a0 <= a1 <= b0 < b1  # no gap, always moving forward
        overlaps.append(b0 - a1)
        assert b0 - a1 <= 50
        if a1 < b0:  # the repeated part begins at a boundary, never inside a word
            assert not (text[a1 - 1].isascii() and text[a1 - 1].isalnum() and text[a1].isascii() and text[a1].isalnum())
    assert sum(o > 0 for o in overlaps) > len(overlaps) / 2


def test_overlap_in_tokens_keeps_the_token_limit(tokenizer):
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    spans = split_text(ZH, 64, Tokens(tokenizer), overlap=16)
    assert max(count(ZH[a:b]) for a, b in spans) <= 64
    assert sum(b0 > a1 for (_, b0), (a1, _) in zip(spans, spans[1:])) > len(spans) / 2


def _hanzi(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(n))


# ---- the stage ----------------------------------------------------------------------------------

def test_offsets_point_back_into_the_normalised_source(make_config, tmp_path):
    raw = ("标题\r\n\r\n" + ZH.replace("\n", "\r\n") + "\x07\x00" + EN).encode("utf-8")
    src = tmp_path / "src.txt"
    src.write_bytes(raw)
    cfg = make_config(raw=src, chunk_size=200, data__min_chunk_chars=1, data__dedup_threshold=1.0)
    doc = normalise(raw.decode("utf-8"))
    recs = list(chunk_blocks(read_blocks(str(src), block_chars=700), cfg, len, Deduper(1.0)))
    assert len({r["start"] for r in recs}) == len(recs) > 20
    for rec in recs:
        assert rec["source"] == str(src)
        assert doc[rec["start"]:rec["end"]] == rec["text"]
        assert len(rec["text"]) <= 200
    assert "".join("".join(r["text"].split()) for r in recs) == "".join(doc.split())  # up to whitespace at cuts
    assert [r["chunk_id"] for r in recs] == list(range(len(recs)))
    assert {r["lang"] for r in recs} == {"zh", "en"}


def test_jsonl_records_are_chunked_with_their_own_offsets(make_config, tmp_path):
    src = tmp_path / "docs.jsonl"
    docs = [ZH[:900], EN[:900]]
    src.write_text("\n".join(json.dumps({"body": d}, ensure_ascii=False) for d in docs), encoding="utf-8")
    cfg = make_config(raw=src, chunk_size=300, data__text_field="body")
    stats = run_chunk(cfg)
    recs = [json.loads(line) for line in (cfg.work / "chunks.jsonl").read_text(encoding="utf-8").splitlines()]
    assert stats["chunks"] == len(recs) and {r["source"] for r in recs} == {f"{src}#L1", f"{src}#L2"}
    for rec in recs:
        doc = docs[int(rec["source"].rsplit("#L", 1)[1]) - 1]
        assert doc[rec["start"]:rec["end"]] == rec["text"]


def test_boundary_patterns_written_for_speed_match_their_plain_forms():
    """LEVELS and SENTENCE_END start with a character class for speed; these are the readable forms."""
    cjk = "\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff"
    sentence = rf"(?:[。！？…]+[{_CLOSERS}]*|[.!?]+[{_CLOSERS}]*(?=\s|$|[{cjk}]))"
    clause = rf"[，；：、][{_CLOSERS}]*\s*|[,;:][{_CLOSERS}]*(?:\s+|$|(?=[{cjk}]))"
    plain = {SENTENCE_END: sentence, LEVELS[1]: rf"[。！？….!?]+[{_CLOSERS}]*[ \t]*\n\s*",
             LEVELS[2]: sentence + r"\s*", LEVELS[3]: clause}
    alphabet = list("。！？….!?,;:，；：、”」)' \t\n\n") + ["a", "中", "か", "\u3000", "3"]
    rng = random.Random(7)
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        a = rng.randint(0, len(text))
        b = rng.randint(a, len(text))
        for fast, slow in plain.items():
            want = [m.span() for m in re.compile(slow).finditer(text, a, b)]
            assert [m.span() for m in fast.finditer(text, a, b)] == want, (fast.pattern, text, a, b)


def test_the_fast_json_quote_is_json(tmp_path):
    for text in ['say "hi" \\ back\n\tthen', "全角“引号”，\u2028分隔", "", "\\n"]:
        assert _quote(text) == json.dumps(text, ensure_ascii=False)


def test_run_chunk_removes_and_counts_duplicates(make_config, tmp_path):
    rng = random.Random(5)
    paragraphs = [_hanzi(rng, 240) + "。" for _ in range(5)]
    near = paragraphs[2][:100] + "改" + paragraphs[2][101:]
    src = tmp_path / "dups.txt"
    src.write_text("\n\n".join(paragraphs + [paragraphs[1], near]), encoding="utf-8")
    stats = run_chunk(make_config(raw=src, chunk_size=300))
    assert (stats["chunks"], stats["exact_duplicates"], stats["near_duplicates"]) == (5, 1, 1)
    lines = (tmp_path / "work" / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == paragraphs
    assert json.loads(lines[0]) == {"chunk_id": 0, "source": str(src), "start": 0, "end": 241, "lang": "zh",
                                    "text": paragraphs[0]}  # the fast writer is plain JSON


def test_run_chunk_in_tokens(make_config, tokenizer):
    cfg = make_config(chunk_size=48, data__chunk_unit="tokens")
    stats = run_chunk(cfg)
    recs = [json.loads(line) for line in (cfg.work / "chunks.jsonl").read_text(encoding="utf-8").splitlines()]
    assert stats["chunks"] == len(recs) > 10
    assert max(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in recs) <= 48


def test_empty_input_is_a_clear_error(make_config, tmp_path):
    src = tmp_path / "empty.txt"
    src.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="no text found"):
        run_chunk(make_config(raw=src))


@pytest.mark.parametrize("setting", ["truncation", "padding"])
def test_a_tokenizer_that_truncates_or_pads_still_counts_every_token(tokenizer, setting):
    import copy

    tok = copy.deepcopy(tokenizer)
    if setting == "truncation":
        tok.backend_tokenizer.enable_truncation(8)
    else:
        tok.backend_tokenizer.enable_padding(length=64)
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    spans = split_text(ZH, 40, Tokens(tok))
    assert max(count(ZH[a:b]) for a, b in spans) <= 40
    assert len(spans) < len(ZH) / 20  # real chunks, not one character each
    assert getattr(tok.backend_tokenizer, setting) is not None  # the caller's tokenizer is left as it was


def test_an_overlap_as_big_as_the_chunk_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        split_text(ZH, 100, overlap=100)


def test_max_chunks_stops_reading_early(make_config):
    cfg = make_config(raw=SAMPLE_ZH, data__max_chunks=2)
    stats = run_chunk(cfg)
    lines = (cfg.work / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
    assert stats["chunks"] == len(lines) == 2
