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
Exact and near-duplicate chunks are removed and counted: one-permutation MinHash over character
5-grams (64 buckets, densified), computed for a whole block of chunks in one vectorised pass, and
LSH banding (8 bands of 3) to find candidates. The index keeps, per kept chunk, its hash, its packed
signature (64 bytes) and 8 band keys (64 bytes), all in numpy arrays: it grows by about 140 bytes
per kept chunk (docs/BENCHMARKS.md has the measured figure).
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Callable, Iterable, Iterator

import numpy as np

from shifu.config import Config
from shifu.errors import UserError
from shifu.files import atomic_path
from shifu.read import Block, read_blocks

_CLOSERS = "”’」』）)》】\"'"
_CJK_CHARS = "\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff"
_ENDS = "。！？….!?"
# A Latin .!? ends a sentence only before whitespace, the end, or CJK: not inside 3.14, e.g. or a URL.
_SENTENCE = rf"(?:[。！？…]+[{_CLOSERS}]*|[.!?]+[{_CLOSERS}]*(?=\s|$|[{_CJK_CHARS}]))"
SENTENCE_END = re.compile(rf"(?=[{_ENDS}]){_SENTENCE}")
# Each pattern starts with a lookahead on one character class: it lets `re` skip ahead fast (3x on English).
LEVELS = [
    re.compile(r"\n[ \t]*\n\s*"),                                          # paragraph
    re.compile(rf"[{_ENDS}]+[{_CLOSERS}]*[ \t]*\n\s*"),                     # sentence that ends a line
    re.compile(rf"(?=[{_ENDS}]){_SENTENCE}\s*"),                            # sentence
    re.compile(rf"(?=[，；：、,;:])(?:[，；：、][{_CLOSERS}]*\s*|[,;:][{_CLOSERS}]*(?:\s+|$|(?=[{_CJK_CHARS}])))"),  # clause
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
    from transformers import AutoTokenizer

    return Tokens(AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code))


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
    spans, i, n = [], 0, len(atoms)
    while i < n:
        total, j, best, best_key = 0, i, i + 1, None
        while j < n and (j == i or total + atoms[j][3] <= size):
            total += atoms[j][3]
            j += 1
            key = (total >= min_fill * size, -atoms[j - 1][2], j)
            if best_key is None or key > best_key:
                best, best_key = j, key
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


def language(text: str) -> str:
    """zh when at least a fifth of the letters are CJK ideographs, else en."""
    return languages([text])[0]


# ---- duplicates ---------------------------------------------------------------------------------

_NUM_PERM, _BANDS, _ROWS = 64, 8, 3  # 8 bands of 3: a pair at Jaccard 0.85 shares a band 99.95% of the time
_EMPTY = np.uint32(0xFFFFFFFF)
_K = 5


def _mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: spreads the polynomial hash over all bits (wraps mod 2^32)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts' UTF-16 code units in one uint16 array (plus _K zeros of padding), and each text's end.
    UTF-16 rather than code points: half the bytes for every numpy pass; a character beyond the BMP
    simply counts as two units."""
    joined = "".join(texts)
    raw = (joined + "\0" * _K).encode("utf-16-le")
    if len(raw) // 2 == len(joined) + _K:
        lens = np.fromiter(map(len, texts), np.int64, len(texts))
    else:
        lens = np.fromiter((len(t.encode("utf-16-le")) // 2 for t in texts), np.int64, len(texts))
    return np.frombuffer(raw, np.uint16), np.cumsum(lens)


def _per_text(mask: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """How many True each text has in mask, given each text's end."""
    lens = np.diff(ends, prepend=0)
    if len(mask) == 0:
        return np.zeros(len(ends), np.int64)
    counts = np.add.reduceat(mask.view(np.uint8), np.minimum(ends - lens, len(mask) - 1), dtype=np.int64)
    counts[lens == 0] = 0  # reduceat gives an empty range the element at its start
    return counts


def signatures(texts: list[str], k: int = _K) -> np.ndarray:
    """One-permutation MinHash of each text's character k-grams, whitespace ignored: (len(texts), 64) uint32.

    Every k-gram is hashed once (32 bits): the top 6 bits choose its bucket, the minimum of the other
    26 per bucket is kept, and empty buckets borrow from the next full one (rotation densification).
    All texts of a batch go through numpy together, which is what makes deduplication cheap per chunk."""
    n = len(texts)
    sig = np.full((n, _NUM_PERM), _EMPTY, np.uint32)
    if n == 0:
        return sig
    codes, ends = _codes(texts)
    total = int(ends[-1])
    keep = codes[:total] > 32
    keep &= codes[:total] != 0xA0
    keep &= codes[:total] != 0x3000
    codes = np.concatenate([codes[:total][keep], np.zeros(k, np.uint16)])
    lens = _per_text(keep, ends)
    ends, total = np.cumsum(lens), int(lens.sum())
    h = codes[:total].astype(np.uint32)
    for j in range(1, k):  # polynomial hash of codes[p:p+k]
        h *= np.uint32(1_000_003)
        h += codes[j:total + j]
    h = _mix(h)
    slot = np.repeat(np.arange(n, dtype=np.int64) * _NUM_PERM, lens)
    slot += h >> np.uint32(32 - 6)
    value = h & np.uint32((1 << 26) - 1)
    starts = ends - lens
    for j in range(1, k):  # a gram that runs past the end of its text is not one of its grams
        last = ends - j
        value[last[last >= starts]] = _EMPTY
    np.minimum.at(sig.reshape(-1), slot, value)
    for i in np.flatnonzero(lens < k):  # too short for one k-gram: a signature of the whole text
        whole = hash("".join(texts[i].split())) & ((1 << 26) - 1)
        sig[i] = (whole + np.arange(_NUM_PERM, dtype=np.uint32) * np.uint32(2654435761)) & np.uint32((1 << 26) - 1)
    return _densify(sig)


def languages(texts: list[str]) -> list[str]:
    """language() of many texts in one vectorised pass."""
    if not texts:
        return []
    codes, ends = _codes(texts)
    codes = codes[:int(ends[-1])]
    # Range tests as one unsigned comparison each: below the range wraps round to a large number.
    cjk = _per_text(((codes - 0x3400) < 0xA000 - 0x3400) | ((codes - 0xF900) < 0xFB00 - 0xF900), ends)
    latin = _per_text(((codes | 0x20) - 0x61) < 26, ends)
    return ["zh" if c >= 0.2 * max(1, c + l) else "en" for c, l in zip(cjk.tolist(), latin.tolist())]


def _densify(sig: np.ndarray) -> np.ndarray:
    empty = sig == _EMPTY
    rows = np.flatnonzero(empty.any(axis=1))
    if len(rows) == 0:
        return sig
    sub, need = sig[rows], empty[rows]
    filled = sub.copy()
    for d in range(1, _NUM_PERM):
        if not need.any():
            break
        rolled = np.roll(sub, -d, axis=1)
        take = need & (rolled != _EMPTY)
        filled[take] = rolled[take] + np.uint32(d)
        need &= ~take
    sig[rows] = filled
    return sig


def _band_keys(sig: np.ndarray) -> np.ndarray:
    """One 30-bit key per band of 3 MinHash values, (len(sig), 8) uint32, the band's number mixed in
    so that one index serves all bands; a rare collision of unrelated keys only costs a comparison."""
    bands = sig[:, :_BANDS * _ROWS].reshape(len(sig), _BANDS, _ROWS).astype(np.uint64)
    key = np.broadcast_to(np.arange(1, _BANDS + 1, dtype=np.uint64), (len(sig), _BANDS)).copy()
    for r in range(_ROWS):
        key = key * np.uint64(0x100000001B3) + bands[:, :, r]
    return ((key ^ (key >> np.uint64(31))) & np.uint64((1 << 30) - 1)).astype(np.uint32)


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two (sorted keys, values) runs as one; timsort merges two sorted runs in linear time."""
    keys, values = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
    order = np.argsort(keys, kind="stable")
    return keys[order], values[order]


class _SortedIndex:
    """Key -> value in sorted numpy arrays (a 32-bit band key takes 8 bytes, where a dict entry takes
    about 70): a small run takes each batch's new keys and is merged into the big one every `spill`
    keys, so that adding costs time in proportion to the small run."""

    def __init__(self, key_dtype, spill: int = 1 << 16):
        empty = (np.empty(0, key_dtype), np.empty(0, np.int32))
        self.recent, self.settled, self.spill = empty, empty, spill

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where absent; same shape as keys."""
        flat = keys.ravel()
        found = np.full(len(flat), -1, np.int64)
        for run_keys, run_values in (self.settled, self.recent):
            if len(run_keys):
                pos = np.minimum(np.searchsorted(run_keys, flat), len(run_keys) - 1)
                found = np.where(run_keys[pos] == flat, run_values[pos], found)
        return found.reshape(keys.shape)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add keys (sorted, absent so far, no two alike) with their values."""
        self.recent = _merge(self.recent, (keys, values.astype(np.int32)))
        if len(self.recent[0]) >= self.spill:
            self.settled, self.recent = _merge(self.settled, self.recent), (self.recent[0][:0], self.recent[1][:0])

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.recent, *self.settled))


def _first_in_batch(keys: np.ndarray) -> np.ndarray:
    """For each (row, band), the first row of the batch with the same key (the row itself if none)."""
    _, first, inverse = np.unique(keys.ravel(), return_index=True, return_inverse=True)
    return (first // keys.shape[1])[inverse].reshape(keys.shape)


def _pairs(candidates: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, candidate) pairs from a (rows, bands) table where valid, each pair once, by row."""
    rows, bands = np.nonzero(valid)
    pairs = np.unique(rows.astype(np.int64) << 32 | candidates[rows, bands])  # candidates < 2^32
    return pairs >> 32, pairs & 0xFFFFFFFF


class Deduper:
    """Remembers what it has kept: a hash of each text, and MinHash band keys for near-duplicates.

        dedup = Deduper(0.85)
        dedup.keep(["one text", "another", "one text"])   # [True, True, False]

    A batch goes through numpy together: every LSH candidate pair (a shared band) is compared in one
    vectorised step; only pairs of near copies inside the batch are then walked in order. Memory per
    kept text, all in numpy arrays: its hash (12 bytes), 8 band keys (64 bytes) and its signature
    (64 one-byte lanes: b-bit MinHash with b = 8, where unequal values collide 1 time in 256, which
    moves no estimate near a threshold).
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.exact = _SortedIndex(np.int64)  # hash of every text seen -> 0
        self.bands = _SortedIndex(np.uint32)  # band key -> the first kept text that has it
        self.sigs = np.empty((0, _NUM_PERM), np.uint8)  # signature of every kept text; grown by doubling
        self.count = 0
        self.exact_dups = self.near_dups = 0

    def keep(self, texts: list[str]) -> list[bool]:
        """For each text, in order, whether it is new: no exact copy of a text seen before it, and no
        near copy (whitespace ignored) of a text kept before it. Kept texts are remembered."""
        hashes = np.fromiter(map(hash, texts), np.int64, len(texts))  # process-local: fine for an in-memory index
        unique, first = np.unique(hashes, return_index=True)
        new = np.zeros(len(texts), bool)
        new[first[self.exact.lookup(unique) < 0]] = True  # first in the batch, and not seen before
        self.exact.add(np.sort(hashes[new]), np.zeros(int(new.sum()), np.int32))
        self.exact_dups += len(texts) - int(new.sum())
        rows = np.flatnonzero(new)
        if self.threshold < 1 and len(rows):
            new[rows[self._near_copies([texts[i] for i in rows.tolist()])]] = False
        return new.tolist()

    def is_duplicate(self, text: str) -> bool:
        return not self.keep([text])[0]

    def _near_copies(self, texts: list[str]) -> np.ndarray:
        """Which texts are near copies of a kept text or of an earlier one here; remember the others."""
        n = len(texts)
        sigs = signatures(texts)
        keys = _band_keys(sigs)
        packed = sigs.astype(np.uint8)
        need = self.threshold * _NUM_PERM
        found = self.bands.lookup(keys)  # kept texts that share a band
        r, j = _pairs(found, found >= 0)
        near = np.zeros(n, bool)
        near[r[(self.sigs[j] == packed[r]).sum(axis=1) >= need]] = True
        earlier = _first_in_batch(keys)  # earlier texts of this batch that share a band
        r, e = _pairs(earlier, earlier < np.arange(n)[:, None])
        similar = (packed[e] == packed[r]).sum(axis=1) >= need
        for r, e in zip(r[similar].tolist(), e[similar].tolist()):  # by row: near[e] is final first
            near[r] |= not near[e]
        self.near_dups += int(near.sum())
        self._remember(np.flatnonzero(~near), keys, found, packed)
        return near

    def _remember(self, rows: np.ndarray, keys: np.ndarray, found: np.ndarray, packed: np.ndarray) -> None:
        # New band keys: those of kept rows not in the index, each from the first kept row that has it.
        new_keys, first = np.unique(keys[rows].ravel(), return_index=True)
        absent = found[rows].ravel()[first] < 0
        self.bands.add(new_keys[absent], self.count + (first // _BANDS)[absent])
        if self.count + len(rows) > len(self.sigs):
            grown = np.empty((max(1024, 2 * (self.count + len(rows))), _NUM_PERM), np.uint8)
            grown[:self.count] = self.sigs[:self.count]
            self.sigs = grown
        self.sigs[self.count:self.count + len(rows)] = packed[rows]
        self.count += len(rows)

    def nbytes(self) -> int:
        """What the index holds, for reports: hashes, band keys, signatures."""
        return self.exact.nbytes() + self.bands.nbytes() + self.sigs.nbytes  # sigs: allocated, not just used


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


def _line(rec: dict, quote: Callable[[str], str] = json.encoder.encode_basestring) -> str:
    """json.dumps(rec, ensure_ascii=False) + newline, twice as fast: only the two strings need escaping,
    which json's own C function does (the one JSONEncoder(ensure_ascii=False) calls)."""
    return (f'{{"chunk_id": {rec["chunk_id"]}, "source": {quote(rec["source"])}, "start": {rec["start"]}, '
            f'"end": {rec["end"]}, "lang": "{rec["lang"]}", "text": {quote(rec["text"])}}}\n')


def run_chunk(cfg: Config, dedup: Deduper | None = None) -> dict:
    """Read raw_data_path, write work_dir/chunks.jsonl; return counts for the run summary.
    `dedup` lets a caller (the benchmark) look at the index afterwards."""
    measure = token_measure(cfg.model_name, cfg.trust_remote_code) if cfg.data.chunk_unit == "tokens" else Chars()
    blocks = read_blocks(cfg.raw_data_path, cfg.data.encoding, cfg.data.text_field)
    count = chars = 0
    dedup = dedup or Deduper(cfg.data.dedup_threshold)
    out = cfg.work / "chunks.jsonl"
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in chunk_blocks(blocks, cfg, measure, dedup):
            f.write(_line(rec))
            count += 1
            chars += len(rec["text"])
        if count == 0:
            raise UserError(f"raw_data_path {cfg.raw_data_path!r}: no text found (empty file, or every chunk "
                            f"shorter than data.min_chunk_chars={cfg.data.min_chunk_chars})")
    return {"chunks": count, "chunk_chars": chars, "exact_duplicates": dedup.exact_dups,
            "near_duplicates": dedup.near_dups}
