"""Top-k logprobs packed compactly: per answer token, the chosen token and its top-k alternatives, as
token bytes and float32 values, zlib'd. The teacher clients pack them (`shifu.teacher`), the store keeps
the blob, and `shifu.targets` unpacks it into distillation targets.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_MAGIC = b"SLP1"


def _tok_bytes(entry: dict) -> bytes:
    raw = entry.get("bytes")
    return bytes(raw) if raw is not None else str(entry.get("token", "")).encode("utf-8")


def pack_logprobs(content: list[dict], k: int) -> bytes:
    """Per answer token: the chosen token and its top-k alternatives, as bytes + float32 logprobs."""
    n = len(content)
    lps = np.full((n, k + 1), -np.inf, dtype=np.float32)
    lens = np.zeros((n, k + 1), dtype=np.uint16)
    data = bytearray()
    for i, entry in enumerate(content):
        slots = [entry] + list(entry.get("top_logprobs") or [])[:k]
        for j, slot in enumerate(slots):
            b = _tok_bytes(slot)
            lens[i, j] = len(b)
            lps[i, j] = float(slot.get("logprob", -np.inf))
            data += b
    header = struct.pack("<4sII", _MAGIC, n, k)
    return zlib.compress(header + lens.tobytes() + lps.tobytes() + bytes(data), 6)


def unpack_logprobs(blob: bytes) -> tuple[list[bytes], np.ndarray, list[list[bytes]], np.ndarray]:
    """-> (chosen token bytes, chosen logprobs (n,), candidate bytes per position, candidate logprobs (n, k))."""
    raw = zlib.decompress(blob)
    magic, n, k = struct.unpack_from("<4sII", raw)
    if magic != _MAGIC:
        raise ValueError("not a shifu logprobs blob (pack_logprobs writes them)")
    off = 12
    lens = np.frombuffer(raw, np.uint16, n * (k + 1), off).reshape(n, k + 1)
    off += lens.nbytes
    lps = np.frombuffer(raw, np.float32, n * (k + 1), off).reshape(n, k + 1)
    off += lps.nbytes
    toks: list[list[bytes]] = []
    for row in lens:
        cells = []
        for length in row:
            cells.append(raw[off:off + int(length)])
            off += int(length)
        toks.append(cells)
    return [t[0] for t in toks], lps[:, 0].copy(), [t[1:] for t in toks], lps[:, 1:].copy()
