"""Stage 1: read the raw text and split it into chunks that keep meaning whole.

    shifu chunk configs/demo.yaml            # writes <work_dir>/chunks.jsonl
    from shifu.chunk import split_text       # pure: text -> [(start, end), ...]

Why our own splitter rather than semantic-text-splitter: measured here (../shared/BASELINES.md) it
is quadratic on one huge string and, in token mode, leaves opening quotes at the end of chunks;
LangChain's recursive splitter cuts a third of Chinese chunks mid-sentence. This one descends a
fixed ladder of boundaries, each kept at the end of the piece before it:
  blank line > line break > sentence end (。！？… .!? plus closing quotes) > clause (，；：,;:)
  > whitespace > any character that is not a combining mark,
and greedily packs the pieces of the highest level that fits. A sentence that fits is never split;
one longer than the limit is split at its best clause, then word boundary. Offsets are kept, so
every chunk points back to its source, and without overlap the chunks concatenate to the text.
Exact and near-duplicate chunks (MinHash over character 5-grams, LSH banding) are removed and counted.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Callable, Iterator

import numpy as np

from shifu.config import Config
from shifu.errors import UserError
from shifu.files import atomic_path
from shifu.read import Block, read_blocks

_CLOSERS = "”’」』）)》】\"'"
LEVELS = [
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n+"),
    re.compile(rf"(?:[。！？!?]+|…+|\.{{3,}}|\.(?=\s|$))[{_CLOSERS}]*\s*"),
    re.compile(rf"[，；：、,;:][{_CLOSERS}]*\s*"),
    re.compile(r"\s+"),
]
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")

Measure = Callable[[str], int]


def _pieces(text: str, start: int, end: int, level: int) -> list[tuple[int, int]]:
    """Split text[start:end] after every boundary of this level; the boundary stays with the left piece."""
    cuts = [m.end() for m in LEVELS[level].finditer(text, start, end) if start < m.end() < end]
    bounds = [start, *cuts, end]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _hard_split(text: str, start: int, end: int, size: int, measure: Measure) -> list[tuple[int, int]]:
    """Last resort: cut anywhere but before a combining mark; binary search keeps it linear-ish."""
    out = []
    while start < end:
        lo, hi = start + 1, end
        while lo < hi:  # largest stop with measure(text[start:stop]) <= size
            mid = (lo + hi + 1) // 2
            if measure(text[start:mid]) <= size:
                lo = mid
            else:
                hi = mid - 1
        stop = lo
        while stop < end and stop > start + 1 and unicodedata.combining(text[stop]):
            stop -= 1
        out.append((start, stop))
        start = stop
    return out


def _atoms(text: str, start: int, end: int, size: int, measure: Measure, level: int, end_level: int,
           out: list[tuple[int, int, int]]) -> None:
    """Cut text[start:end] into pieces that fit, descending the ladder only where a piece does not.

    Each atom records the strength of the boundary it ends on (lower is stronger)."""
    if measure(text[start:end]) <= size:
        out.append((start, end, end_level))
        return
    if level == len(LEVELS):
        spans = _hard_split(text, start, end, size, measure)
        out.extend((a, b, level if k < len(spans) - 1 else end_level) for k, (a, b) in enumerate(spans))
        return
    pieces = _pieces(text, start, end, level)
    for k, (a, b) in enumerate(pieces):
        _atoms(text, a, b, size, measure, level + 1, level if k < len(pieces) - 1 else end_level, out)


def _pack(atoms: list[tuple[int, int, int]], sizes: list[int], size: int, min_fill: float = 0.5) -> list[tuple[int, int]]:
    """Greedy packing; within each window cut at the strongest boundary that leaves the chunk at least
    min_fill full (so a lone title does not become a chunk), the latest such boundary on ties."""
    spans, i, n = [], 0, len(atoms)
    while i < n:
        total, j, best, best_key = 0, i, i + 1, None
        while j < n and (j == i or total + sizes[j] <= size):
            total += sizes[j]
            j += 1
            key = (total >= min_fill * size, -atoms[j - 1][2], j)
            if best_key is None or key > best_key:
                best, best_key = j, key
        cut = n if j == n else best
        spans.append((atoms[i][0], atoms[cut - 1][1]))
        i = cut
    return spans


def _split(text: str, size: int, measure: Measure) -> list[tuple[int, int]]:
    if not text:
        return []
    atoms: list[tuple[int, int, int]] = []
    _atoms(text, 0, len(text), size, measure, 0, 0, atoms)
    sizes = [measure(text[a:b]) for a, b, _ in atoms]
    spans = _pack(atoms, sizes, size)
    if measure is len:
        return spans
    # Token counts of pieces do not add up exactly; re-split the rare chunk that overshoots.
    out = []
    for a, b in spans:
        if measure(text[a:b]) <= size:
            out.append((a, b))
        else:
            out.extend((a + x, a + y) for x, y in _split(text[a:b], size - 1, measure))
    return out


def split_text(text: str, size: int, measure: Measure = len, overlap: int = 0) -> list[tuple[int, int]]:
    """Chunk boundaries as (start, end) offsets into text; each chunk measures at most `size`.

    With overlap, each chunk but the first starts up to `overlap` units earlier, at a clause or
    sentence boundary where one lies in reach; the packing budget shrinks to keep the limit.
    """
    spans = _split(text, size - overlap, measure)
    if overlap <= 0:
        return spans
    out = [spans[0]]
    for start, end in spans[1:]:
        lo = start
        while lo > 0 and measure(text[lo - 1:start]) <= overlap:
            lo -= 1
        window = text[lo:start]
        m = None
        for m in LEVELS[3].finditer(window):
            break
        if m is None:
            m = next(LEVELS[2].finditer(window), None)
        new_start = lo + m.end() if m is not None and m.end() < len(window) else lo
        out.append((new_start, end))
    return out


def language(text: str) -> str:
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    return "zh" if cjk >= 0.2 * max(1, cjk + latin) else "en"


# ---- duplicates ---------------------------------------------------------------------------------

_NUM_PERM, _BANDS = 64, 16
_rng = np.random.default_rng(20240601)
_A = _rng.integers(1, (1 << 61) - 1, _NUM_PERM, dtype=np.uint64) | np.uint64(1)
_B = _rng.integers(0, (1 << 61) - 1, _NUM_PERM, dtype=np.uint64)
_SPACE = re.compile(r"\s+")


def minhash(text: str, k: int = 5) -> np.ndarray:
    """64 MinHash values over character k-grams, computed without a Python loop over the text."""
    codes = np.frombuffer(_SPACE.sub("", text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < k:
        codes = np.pad(codes, (0, k - len(codes)))
    grams = np.zeros(len(codes) - k + 1, dtype=np.uint64)
    for j in range(k):  # polynomial rolling hash, wrapping mod 2^64
        grams = grams * np.uint64(1_000_003) + codes[j:len(codes) - k + 1 + j]
    with np.errstate(over="ignore"):
        mixed = grams[None, :] * _A[:, None] + _B[:, None]
    return (mixed >> np.uint64(32)).min(axis=1).astype(np.uint32)


class Deduper:
    """Remembers what it has seen: exact text hashes, and MinHash bands for near-duplicates."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.exact: set[bytes] = set()
        self.bands: list[dict[bytes, int]] = [{} for _ in range(_BANDS)]
        self.signatures: list[np.ndarray] = []
        self.exact_dups = self.near_dups = 0

    def is_duplicate(self, text: str) -> bool:
        digest = hashlib.blake2b(_SPACE.sub("", text).encode(), digest_size=12).digest()
        if digest in self.exact:
            self.exact_dups += 1
            return True
        self.exact.add(digest)
        if self.threshold >= 1:
            return False
        sig = minhash(text)
        rows = _NUM_PERM // _BANDS
        keys = [sig[b * rows:(b + 1) * rows].tobytes() for b in range(_BANDS)]
        for band, key in zip(self.bands, keys):
            other = band.get(key)
            if other is not None and np.mean(self.signatures[other] == sig) >= self.threshold:
                self.near_dups += 1
                return True
        idx = len(self.signatures)
        self.signatures.append(sig)
        for band, key in zip(self.bands, keys):
            band.setdefault(key, idx)
        return False


# ---- the stage ----------------------------------------------------------------------------------

def token_measure(model_name: str, trust_remote_code: bool = False) -> Measure:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


def chunk_blocks(blocks: Iterator[Block], cfg: Config, measure: Measure, dedup: Deduper) -> Iterator[dict]:
    """Blocks in, chunk records out; duplicates are counted in `dedup`, not yielded."""
    n = 0
    for block in blocks:
        for start, end in split_text(block.text, cfg.chunk_size, measure, cfg.data.chunk_overlap):
            text = block.text[start:end].strip()
            if len(text) < cfg.data.min_chunk_chars or dedup.is_duplicate(text):
                continue
            lead = len(block.text[start:end]) - len(block.text[start:end].lstrip())
            yield {"chunk_id": n, "source": block.source, "start": block.offset + start + lead,
                   "end": block.offset + start + lead + len(text), "lang": language(text), "text": text}
            n += 1


def run_chunk(cfg: Config) -> dict:
    """Read raw_data_path, write work_dir/chunks.jsonl; return counts for the run summary."""
    measure = token_measure(cfg.model_name, cfg.trust_remote_code) if cfg.data.chunk_unit == "tokens" else len
    blocks = read_blocks(cfg.raw_data_path, cfg.data.encoding, cfg.data.text_field)
    count = chars = 0
    dedup = Deduper(cfg.data.dedup_threshold)
    out = cfg.work / "chunks.jsonl"
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in chunk_blocks(blocks, cfg, measure, dedup):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
            chars += len(rec["text"])
        if count == 0:
            raise UserError(f"raw_data_path {cfg.raw_data_path!r}: no text found (empty file, or every chunk "
                            f"shorter than data.min_chunk_chars={cfg.data.min_chunk_chars})")
    return {"chunks": count, "chunk_chars": chars, "exact_duplicates": dedup.exact_dups,
            "near_duplicates": dedup.near_dups}
