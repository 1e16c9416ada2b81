"""Stage 1: read the raw text and split it into chunks that keep meaning whole.

    shifu chunk configs/demo.yaml            # writes <work_dir>/chunks.jsonl
    from shifu.chunk import split_text       # pure: text -> [(start, end), ...]
    split_text(text, 500)                    # at most 500 characters a chunk
    split_text(text, 256, Tokens(tok))       # at most 256 tokens of a Hugging Face tokenizer

Why our own splitter rather than semantic-text-splitter: measured here (../shared/BASELINES.md) it
is quadratic on one huge string and, in token mode, leaves opening quotes at the end of chunks;
LangChain's recursive splitter cuts a third of Chinese chunks mid-sentence. This one descends a
fixed ladder of boundaries, each kept at the end of the piece before it:
  blank line > sentence end at a line end > sentence end (。！？… and .!? before a space, each with
  its closing quotes) > clause (，；：、 and ,;: before a space) > line break > whitespace
  > any character that neither splits a Latin word or number nor comes before a combining mark,
descending only where a piece does not fit, and greedily packs the pieces, cutting each chunk at
the strongest boundary that leaves it at least half full. A sentence that fits is never split; one
longer than the limit is split at its best clause, then line, then word. A line break ranks below a
clause because hard-wrapped text (Project Gutenberg, PDF extraction) breaks lines mid-sentence.
Offsets are kept, so every chunk points back to its source, and without overlap the chunks
concatenate to the text. In token mode, pieces are counted in batches (one tokenizer call for all the
pieces of a span that does not fit, not one per piece), and every finished chunk is counted again as
a whole, since token counts of pieces do not quite add up.
Exact and near-duplicate chunks are removed and counted (shifu.dedup: MinHash over character
5-grams with LSH banding, vectorised per block).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from typing import Callable, Iterable, Iterator

from shifu.config import Config
from shifu.dedup import Deduper, languages
from shifu.errors import UserError
from shifu.files import atomic_path
from shifu.read import Block, read_blocks

_CLOSERS = "”’」』）)》】\"'"
_CJK_CHARS = "\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff"
_ENDS = "。！？….!?"
# A Latin .!? ends a sentence only before whitespace, the end, or CJK: not inside 3.14, e.g. or a URL.
# Each pattern starts with a plain character class (not a lookahead, a repeat or an alternation): then
# `re` skips in C to the next character that can start a match, 2x faster on English than trying a
# match at every position; a lookbehind on that first character picks the branch.
_SENTENCE = (rf"[{_ENDS}](?:(?<=[。！？…])[。！？…]*[{_CLOSERS}]*"
             rf"|(?<=[.!?])[.!?]*[{_CLOSERS}]*(?=\s|$|[{_CJK_CHARS}]))")
SENTENCE_END = re.compile(_SENTENCE)
LEVELS = [
    re.compile(r"\n[ \t]*\n\s*"),                                          # paragraph
    re.compile(rf"[{_ENDS}][{_ENDS}]*[{_CLOSERS}]*[ \t]*\n\s*"),               # sentence that ends a line
    re.compile(rf"{_SENTENCE}\s*"),                                        # sentence
    re.compile(rf"[，；：、,;:](?:(?<=[，；：、])[{_CLOSERS}]*\s*"
               rf"|(?<=[,;:])[{_CLOSERS}]*(?:\s+|$|(?=[{_CJK_CHARS}])))"),   # clause
    re.compile(r"\n\s*"),                                                  # line
    re.compile(r"\s+"),                                                    # word
]
HARD = len(LEVELS)  # the last resort: between two characters
_SURELY_OVER = 8  # a span longer than 8 units' worth of characters per unit is split unmeasured


# ---- measures -----------------------------------------------------------------------------------

class Chars:
    """chunk_unit chars: the size of a span is its length, and sizes add up exactly."""

    additive = True

    def span_sizes(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        return [b - a for a, b in spans]


class Func:
    """Any function of a string, e.g. a word count; sizes are checked again on whole chunks."""

    additive = False

    def __init__(self, fn: Callable[[str], int]):
        self.fn = fn

    def span_sizes(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        return [self.fn(text[a:b]) for a, b in spans]


class Tokens:
    """chunk_unit tokens: counts from a Hugging Face tokenizer, many spans per call."""

    additive = False
    BATCH_CHARS = 1 << 16  # bounds the tokenizer's memory for one call

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: count without Python lists
        if backend is not None and (backend.truncation or backend.padding):
            # A tokenizer.json may ask for truncation or padding, which would falsify counts; use a copy without.
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.encode = backend and getattr(backend, "encode_batch_fast", backend.encode_batch)

    def sizes(self, texts: list[str]) -> list[int]:
        out: list[int] = []
        start = chars = 0
        for end, t in enumerate(texts, 1):
            chars += len(t)
            if chars >= self.BATCH_CHARS or end == len(texts):
                out.extend(self._count(texts[start:end]))
                start, chars = end, 0
        return out

    def _count(self, texts: list[str]) -> list[int]:
        if self.encode:
            return [len(e) for e in self.encode(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def span_sizes(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        return self.sizes([text[a:b] for a, b in spans])


Measure = Chars | Func | Tokens


def as_measure(measure) -> Measure:
    if measure is None or measure is len:
        return Chars()
    if hasattr(measure, "span_sizes"):
        return measure
    return Func(measure)


def token_measure(model_name: str, trust_remote_code: bool = False) -> Tokens:
    from shifu.models import load_tokenizer  # a missing model is the one line every stage gives

    return Tokens(load_tokenizer(model_name, trust_remote_code))


# ---- splitting ----------------------------------------------------------------------------------

def _pieces(text: str, start: int, end: int, level: int) -> list[tuple[int, int]]:
    """Split text[start:end] after every boundary of this level; the boundary stays with the left piece."""
    cuts = [m.end() for m in LEVELS[level].finditer(text, start, end)]  # every match ends after start
    if cuts and cuts[-1] == end:
        cuts.pop()
    bounds = [start, *cuts, end]
    return list(zip(bounds, bounds[1:]))


def _is_word_char(c: str) -> bool:
    # Latin, Greek, Cyrillic letters and digits; CJK characters are words of their own.
    return c.isalnum() and c < "\u2e80"


def _joins(c: str) -> bool:
    """True for a character that belongs to the one before it (combining mark, joiner, selector)."""
    return unicodedata.category(c) in ("Mn", "Mc", "Me") or c in "\u200d\ufe0f"


def _splits_word(text: str, i: int) -> bool:
    return (_is_word_char(text[i - 1]) and _is_word_char(text[i])) or _joins(text[i]) or text[i - 1] == "\u200d"


def _safe_cut(text: str, start: int, stop: int, end: int) -> int:
    """Move a forced cut back to a place that splits no word, within the second half of the piece;
    failing that (one word longer than the limit), at least off a combining mark."""
    if stop >= end:
        return end
    floor = start + max(1, (stop - start) // 2)
    i = stop
    while i > floor and _splits_word(text, i):
        i -= 1
    if not _splits_word(text, i):
        return i
    i = stop
    while i > start + 1 and _joins(text[i]):
        i -= 1
    return i


def _longest_fit(text: str, start: int, end: int, size: int, m: Measure) -> int:
    """Largest stop with text[start:stop] within size (at least one character): gallop, then bisect."""
    def fits(stop: int) -> bool:
        return m.span_sizes(text, [(start, stop)])[0] <= size

    lo, hi = start + 1, min(end, start + size)
    while fits(hi):
        if hi == end:
            return end
        lo, hi = hi, min(end, start + 2 * (hi - start))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _hard_split(text: str, start: int, end: int, strength: int, size: int, m: Measure) -> list[tuple]:
    spans = []
    while start < end:
        stop = _safe_cut(text, start, _longest_fit(text, start, end, size, m), end)
        spans.append((start, stop))
        start = stop
    return [(a, b, HARD if b < spans[-1][1] else strength, s)
            for (a, b), s in zip(spans, m.span_sizes(text, spans))]


def _sizes(text: str, spans: list[tuple[int, int]], size: int, m: Measure) -> list[int]:
    """Sizes of spans, counted in one batch; a span far too long to fit is not counted (size + 1):
    splitting a span that would have fitted costs nothing, since packing joins its pieces again."""
    if m.additive:
        return m.span_sizes(text, spans)
    limit = _SURELY_OVER * size
    todo = [k for k, (a, b) in enumerate(spans) if b - a <= limit]
    sizes = [size + 1] * len(spans)
    for k, s in zip(todo, m.span_sizes(text, [spans[k] for k in todo])):
        sizes[k] = s
    return sizes


def _descend(text: str, a: int, b: int, strength: int, level: int, size: int, m: Measure, out: list) -> None:
    """Append to out the atoms of text[a:b], a span that does not fit, split at `level` or below:
    (start, end, strength of the boundary it ends on (lower is stronger), size)."""
    while level < HARD:
        pieces = _pieces(text, a, b, level)
        if len(pieces) > 1:
            break
        level += 1  # no boundary of this level inside: try the next
    else:
        out.extend(_hard_split(text, a, b, strength, size, m))
        return
    last = len(pieces) - 1
    for k, ((x, y), s) in enumerate(zip(pieces, _sizes(text, pieces, size, m))):
        if s <= size:
            out.append((x, y, level if k < last else strength, s))
        else:
            _descend(text, x, y, level if k < last else strength, level + 1, size, m, out)


def _atoms(text: str, size: int, m: Measure) -> list[tuple]:
    """Pieces that fit, descending the ladder only where a piece does not fit."""
    whole = _sizes(text, [(0, len(text))], size, m)[0]
    if whole <= size:
        return [(0, len(text), 0, whole)]
    out: list[tuple] = []
    _descend(text, 0, len(text), 0, 0, size, m, out)
    return out


def _pack(atoms: list[tuple], size: int, min_fill: float = 0.5) -> list[tuple[int, int]]:
    """Greedy packing; within each window cut at the strongest boundary that leaves the chunk at least
    min_fill full (so a lone title does not become a chunk), the latest such boundary on ties."""
    spans, i, n, fill = [], 0, len(atoms), min_fill * size
    while i < n:
        total, j, best, best_full, best_strength = 0, i, i + 1, False, HARD + 1
        while j < n and (j == i or total + atoms[j][3] <= size):
            _, _, strength, s = atoms[j]
            total += s
            j += 1
            full = total >= fill  # the best cut so far: full first, then strength, then the latest
            if full > best_full or (full == best_full and strength <= best_strength):
                best, best_full, best_strength = j, full, strength
        cut = n if j == n else best
        spans.append((atoms[i][0], atoms[cut - 1][1]))
        i = cut
    return spans


def _split(text: str, size: int, m: Measure) -> list[tuple[int, int]]:
    if not text:
        return []
    spans = _pack(_atoms(text, size, m), size)
    if m.additive:
        return spans
    out = []
    for (a, b), s in zip(spans, m.span_sizes(text, spans)):
        if s <= size or b - a == 1:
            out.append((a, b))
        else:  # pieces' counts undershot the whole: split again on a budget short by the overshoot
            budget = max(1, size - (s - size))
            out.extend((a + x, a + y) for x, y in _split_within(text[a:b], size, budget, m))
    return out


def _split_within(text: str, size: int, budget: int, m: Measure) -> list[tuple[int, int]]:
    while True:
        spans = _pack(_atoms(text, budget, m), budget)
        sizes = m.span_sizes(text, spans)
        if budget == 1 or all(s <= size for s in sizes):
            return spans
        budget = max(1, budget - max(s - size for s in sizes))


def _overlap_start(text: str, floor: int, start: int, overlap: int, m: Measure) -> int:
    """Where a chunk beginning at `start` should begin to repeat at most `overlap` units before it:
    at the earliest sentence, clause or word boundary in reach, never inside a word."""
    lo, hi = max(floor, start - _SURELY_OVER * overlap), start  # find the earliest lo that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if m.span_sizes(text, [(mid, start)])[0] <= overlap else (mid, hi)
    if m.span_sizes(text, [(lo, start)])[0] > overlap:
        lo = hi
    for level in (0, 1, 2, 3, 5):
        for match in LEVELS[level].finditer(text, lo, start):
            if lo < match.end() < start:
                return match.end()
    return lo if lo == 0 or not _splits_word(text, lo) else start


def split_text(text: str, size: int, measure=len, overlap: int = 0) -> list[tuple[int, int]]:
    """Chunk boundaries as (start, end) offsets into text; each chunk measures at most `size`.

    `measure` is len (characters), a `Tokens`, or any function of a string. With overlap, each chunk
    but the first starts up to `overlap` units earlier, at a boundary (see _overlap_start); the
    packing budget shrinks by the overlap so that the limit still holds.
    """
    if not 0 <= overlap < size:
        raise ValueError(f"need 0 <= overlap < size, got overlap {overlap} and size {size}")
    m = as_measure(measure)
    spans = _split(text, size - overlap, m)
    if overlap <= 0 or len(spans) < 2:
        return spans
    out = [spans[0]]
    for (prev, _), (start, end) in zip(spans, spans[1:]):
        out.append((_overlap_start(text, prev, start, overlap, m), end))
    if not m.additive:  # counts of the overlap and the chunk need not add up: drop an overlap that overshoots
        sizes = m.span_sizes(text, out)
        out = [span if s <= size else orig for span, orig, s in zip(out, spans, sizes)]
    return out


# ---- the stage ----------------------------------------------------------------------------------

def chunk_blocks(blocks: Iterable[Block], cfg: Config, measure, dedup: Deduper) -> Iterator[dict]:
    """Blocks in, chunk records out; duplicates are counted in `dedup`, not yielded."""
    m = as_measure(measure)
    n = 0
    for block in blocks:
        found = []
        for start, end in split_text(block.text, cfg.chunk_size, m, cfg.data.chunk_overlap):
            raw = block.text[start:end]
            text = raw.strip()
            if len(text) >= cfg.data.min_chunk_chars:  # its first character is the first non-space of raw
                found.append((block.offset + start + raw.find(text[0]), text))
        texts = [t for _, t in found]
        kept = [(start, text) for (start, text), new in zip(found, dedup.keep(texts)) if new]
        for (start, text), lang in zip(kept, languages([t for _, t in kept])):
            yield {"chunk_id": n, "source": block.source, "start": start, "end": start + len(text),
                   "lang": lang, "text": text}
            n += 1


def _quote(text: str) -> str:
    """json.dumps of a string without ensure_ascii, for text that read_blocks normalised: its only
    control characters are LF and TAB, so four replaces (each one C pass) do the escaping, in two
    thirds of the time of json's own encoder on English chunks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def _line(rec: dict) -> str:
    """json.dumps(rec, ensure_ascii=False) + newline, for a chunk of normalised text (see _quote)."""
    return (f'{{"chunk_id": {rec["chunk_id"]}, "source": {_quoted_source(rec["source"])}, "start": {rec["start"]}, '
            f'"end": {rec["end"]}, "lang": "{rec["lang"]}", "text": {_quote(rec["text"])}}}\n')


_quoted_source = functools.lru_cache(maxsize=8)(json.encoder.encode_basestring)  # any string: json's own


def run_chunk(cfg: Config, dedup: Deduper | None = None) -> dict:
    """Read raw_data_path, write work_dir/chunks.jsonl; return counts for the run summary.
    `dedup` lets a caller (the benchmark) look at the index afterwards."""
    measure = token_measure(cfg.model_name, cfg.trust_remote_code) if cfg.data.chunk_unit == "tokens" else Chars()
    blocks = read_blocks(cfg.raw_data_path, cfg.data.encoding, cfg.data.text_field)
    count = chars = 0
    dedup = dedup or Deduper(cfg.data.dedup_threshold)
    out = cfg.chunks_path
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        lines = []  # written a few hundred at a time: one write per line costs more than the JSON
        for rec in chunk_blocks(blocks, cfg, measure, dedup):
            lines.append(_line(rec))
            count += 1
            chars += len(rec["text"])
            if len(lines) == 512:
                f.write("".join(lines))
                lines.clear()
            if count == cfg.data.max_chunks:
                break  # the reader is lazy: nothing past this chunk is read
        f.write("".join(lines))
        if count == 0:
            raise UserError(f"raw_data_path {cfg.raw_data_path!r}: no text found (empty file, or every chunk "
                            f"shorter than data.min_chunk_chars={cfg.data.min_chunk_chars})")
    return {"chunks": count, "chunk_chars": chars, "exact_duplicates": dedup.exact_dups,
            "near_duplicates": dedup.near_dups}
