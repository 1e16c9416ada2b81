"""Exact and near-duplicate detection and language tagging, vectorised over many texts with numpy.

    dedup = Deduper(threshold=0.85)
    keep = dedup.keep(["一段文字", "一段文字", ...])      # [True, False, ...], counted in dedup
    languages(["孔乙己", "Alice"])                        # ["zh", "en"]

Near duplicates: one-permutation MinHash over character 5-grams (64 buckets, densified), computed
for a whole batch of texts in one vectorised pass, and LSH banding (8 bands of 3) to find
candidates, confirmed by the estimated Jaccard similarity. The index keeps, per kept text, its
hash, its packed signature (64 bytes) and 8 band keys (64 bytes), all in numpy arrays: it grows by
about 140 bytes per kept text (docs/BENCHMARKS.md has the measured figure). The chunk stage uses
it on chunks, the dataset stage on teacher answers.
"""

from __future__ import annotations

import numpy as np


def language(text: str) -> str:
    """zh when at least a fifth of the letters are CJK ideographs, else en."""
    return languages([text])[0]


# ---- duplicates ---------------------------------------------------------------------------------

_NUM_PERM, _BANDS, _ROWS = 64, 8, 3  # 8 bands of 3: a pair at Jaccard 0.85 shares a band 99.95% of the time
_EMPTY = np.uint32(0xFFFFFFFF)
_K = 5
_BATCH_CHARS = 1 << 16


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
    Texts go through numpy together, which is what makes deduplication cheap per chunk, in batches of
    about 64K characters: bigger ones make numpy's temporaries so large that each is mapped and
    faulted in afresh (measured: 11% slower on 0.2 MB at once)."""
    out, start, chars = [], 0, 0
    for i, text in enumerate(texts):
        chars += len(text)
        if chars >= _BATCH_CHARS:
            out.append(_signatures(texts[start:i + 1], k))
            start, chars = i + 1, 0
    if start < len(texts) or not out:
        out.append(_signatures(texts[start:], k))
    return np.concatenate(out) if len(out) > 1 else out[0]


def _signatures(texts: list[str], k: int) -> np.ndarray:
    n = len(texts)
    sig = np.full((n, _NUM_PERM), _EMPTY, np.uint32)
    if n == 0:
        return sig
    codes, ends = _codes(texts)
    total = int(ends[-1])
    keep = codes[:total] > 32
    keep &= codes[:total] != 0xA0
    keep &= codes[:total] != 0x3000
    codes = np.concatenate([np.compress(keep, codes[:total]), np.zeros(k, np.uint16)])  # 2x codes[keep]
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
    return ["zh" if c >= 0.2 * max(1, c + n) else "en" for c, n in zip(cjk.tolist(), latin.tolist())]


def _densify(sig: np.ndarray) -> np.ndarray:
    """Rotation densification: an empty bucket takes the value of the next full one to its right
    (cyclically) plus the distance, found for all rows at once from a running minimum of indices."""
    rows = np.flatnonzero((sig == _EMPTY).any(axis=1))
    if len(rows) == 0:
        return sig
    twice = np.concatenate([sig[rows], sig[rows]], axis=1)  # the cycle, unrolled once
    col = np.arange(2 * _NUM_PERM)
    nearest = np.where(twice != _EMPTY, col, 2 * _NUM_PERM)  # every row has a full bucket: see signatures
    nearest = np.minimum.accumulate(nearest[:, ::-1], axis=1)[:, ::-1][:, :_NUM_PERM]
    sig[rows] = np.take_along_axis(twice, nearest, axis=1) + (nearest - col[:_NUM_PERM]).astype(np.uint32)
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
        for row, dup in zip(r[similar].tolist(), e[similar].tolist()):  # by row: near[dup] is final first
            near[row] |= not near[dup]
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
