"""Map the teacher's per-token distributions onto the student's answer tokens, and keep them on disk.

    rows = align(answer_bytes, student_pieces, teacher_tokens, teacher_lp, cand, cand_lp, vocab)

Both tokenizations are laid on the answer's UTF-8 bytes. For a student token spanning bytes [s, e):
- one teacher token spans exactly [s, e) (always, when both share a tokenizer and the teacher's
  tokens are the canonical ones): its top-k candidate strings are mapped to student token ids by
  their bytes; candidates that land on the same id merge, unknown strings fall into the tail;
- several whole teacher tokens span [s, e): the student token gets the teacher's chain probability
  (sum of the chosen tokens' logprobs), everything else the tail;
- otherwise the position has no teacher distribution and falls back to cross-entropy.
Coverage, the share of answer tokens that got a distribution, is reported by training.

Targets live in a memory-mapped file pair (ids int32, logprobs float32, both (positions, K)) with
an index per example, so teacher tensors for the whole dataset are never held in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NEG_INF = np.float32(-np.inf)


def spans(pieces: list[bytes]) -> np.ndarray:
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    return np.stack([ends - [len(p) for p in pieces], ends], 1) if pieces else np.zeros((0, 2), np.int64)


def _merge(ids: list[int], lps: list[float]) -> tuple[list[int], list[float]]:
    merged: dict[int, float] = {}
    for i, lp in zip(ids, lps):
        merged[i] = float(np.logaddexp(merged[i], lp)) if i in merged else lp
    return list(merged), list(merged.values())


def _student_shift(pieces: bytes, answer: bytes) -> int:
    """Where the answer starts in the student's pieces: 0, or 1 for a SentencePiece leading space.
    The pieces may be cut short (truncation) or run on (an end-of-turn token)."""
    for shift in (0, 1):
        a = pieces[shift:]
        n = min(len(a), len(answer))
        if n and a[:n] == answer[:n] and (shift == 0 or pieces[:1] == b" "):
            return shift
    return -1


def align(answer: bytes, student_pieces: list[bytes], student_ids: list[int], teacher_tokens: list[bytes],
          teacher_lp: np.ndarray, cand: list[list[bytes]], cand_lp: np.ndarray, vocab: dict[bytes, int],
          width: int) -> tuple[np.ndarray, np.ndarray]:
    """-> ids (m, width) int32 with -1 pads and logprobs (m, width) float32, m = len(student_ids)."""
    m = len(student_ids)
    out_ids = np.full((m, width), -1, np.int32)
    out_lp = np.full((m, width), NEG_INF, np.float32)
    s_shift, t_shift = _student_shift(b"".join(student_pieces), answer), b"".join(teacher_tokens).find(answer)
    if s_shift < 0 or t_shift < 0:  # the texts disagree: no position can be trusted
        return out_ids, out_lp
    s_sp, t_sp = spans(student_pieces) - s_shift, spans(teacher_tokens) - t_shift
    starts = {int(a): j for j, (a, _) in enumerate(t_sp)}
    for i in range(m):
        s, e = max(0, int(s_sp[i, 0])), int(s_sp[i, 1])
        j = starts.get(s)
        if j is None:
            continue
        j2, end = j, int(t_sp[j, 1])
        while end < e and j2 + 1 < len(t_sp):
            j2 += 1
            end = int(t_sp[j2, 1])
        if end != e:
            continue
        if j2 == j:
            # a SentencePiece student's first piece carries the space it inserted; so must the candidates
            lead = b" " if (i == 0 and s_shift == 1) else b""
            ids = [vocab.get(lead + b) for b in cand[j]]
            pairs = [(t, float(lp)) for t, lp in zip(ids, cand_lp[j]) if t is not None and np.isfinite(lp)]
            if student_ids[i] not in {t for t, _ in pairs}:
                pairs.append((student_ids[i], float(teacher_lp[j])))
            ids_i, lps_i = _merge([t for t, _ in pairs], [lp for _, lp in pairs])
        else:
            ids_i, lps_i = [student_ids[i]], [float(teacher_lp[j:j2 + 1].sum())]
        n = min(width, len(ids_i))
        order = np.argsort(lps_i)[::-1][:n]
        out_ids[i, :n] = np.asarray(ids_i)[order]
        out_lp[i, :n] = np.asarray(lps_i, np.float32)[order]
    return out_ids, out_lp


def student_vocab(table: tuple[bytes, ...], special_ids: set[int]) -> dict[bytes, int]:
    """bytes -> id for ordinary tokens; the lowest id wins where two tokens share bytes."""
    vocab: dict[bytes, int] = {}
    for i, b in enumerate(table):
        if b and i not in special_ids and b not in vocab:
            vocab[b] = i
    return vocab


class TargetWriter:
    """Append per-example targets to growing memmaps; `close()` writes the index that makes them valid."""

    def __init__(self, folder: Path, capacity: int, width: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.width, self.pos = folder, width, 0
        self.ids = np.lib.format.open_memmap(folder / "ids.npy", "w+", np.int32, (max(capacity, 1), width))
        self.lps = np.lib.format.open_memmap(folder / "logprobs.npy", "w+", np.float32, (max(capacity, 1), width))
        self.index: dict[str, list[int]] = {}
        self.covered = self.total = 0

    def add(self, example: int, ids: np.ndarray, lps: np.ndarray) -> None:
        n = len(ids)
        self.ids[self.pos:self.pos + n] = ids
        self.lps[self.pos:self.pos + n] = lps
        self.index[str(example)] = [self.pos, n]
        self.pos += n
        self.covered += int((ids >= 0).any(1).sum())
        self.total += n

    def close(self) -> dict:
        self.ids.flush()
        self.lps.flush()
        meta = {"width": self.width, "positions": self.pos, "covered": self.covered, "total": self.total,
                "index": self.index}
        (self.folder / "index.json").write_text(json.dumps(meta))
        return meta


class Targets:
    """Read side: the teacher rows of one example, memory-mapped."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "index.json").read_text())
        self.width, self.index = meta["width"], meta["index"]
        self.coverage = meta["covered"] / max(1, meta["total"])
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")
        self.lps = np.load(folder / "logprobs.npy", mmap_mode="r")

    def get(self, example: int) -> tuple[np.ndarray, np.ndarray] | None:
        entry = self.index.get(str(example))
        if entry is None:
            return None
        a, n = entry
        return np.array(self.ids[a:a + n]), np.array(self.lps[a:a + n])
