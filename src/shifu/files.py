"""File I/O at the edges: atomic writes, JSONL, content hashes and the stage manifest.

Every output is written to a temporary file beside its target and renamed into place, so a crash
never leaves a half-written file that a later stage would trust. The manifest records, per stage,
the hashes of its inputs and settings; a stage whose record still matches is skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Like atomic_path for a folder: build it aside, then swap it in. A reader of `target` never
    finds it missing: an existing folder is exchanged with the new one in one rename (Linux), and
    only then removed from its temporary name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if not (target.is_dir() and _exchange(tmp, target)):
            _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange, the old folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (renameat2 RENAME_EXCHANGE); False where the platform or
    file system cannot, and the caller falls back to two renames."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Two renames: `target` is briefly missing. Only where no exchange exists, and build_lock
    keeps readers of shared caches out of that moment."""
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_lock(target: str | Path) -> Iterator[None]:
    """One builder of `target` at a time across processes (the ranks of a launch, or two runs):
    an exclusive flock on `.<name>.lock` beside it. The others wait, then find it built. The kernel
    drops the lock when its holder dies, so a killed builder never blocks the next."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, as removing it would race a waiter


def nearest_existing(path: str | Path) -> Path:
    """The path itself, or the nearest folder above it that exists (where it would be created)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p


def unwritable(path: str | Path) -> str | None:
    """Why a file cannot be created in path (or in the nearest folder above it that exists), else None."""
    p = nearest_existing(path)
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as err:
        return f"{p} is not writable ({err.strerror})"
    return None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    p = Path(path)
    if not p.exists():
        return default
    return json.loads(p.read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_obj(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode())


def hash_path(path: str | Path) -> str:
    """Content hash of a file; for a folder, a hash of its files' names, sizes and mtimes (weights are big)."""
    p = Path(path)
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if p.is_dir():
        entries = sorted((str(q.relative_to(p)), q.stat().st_size, q.stat().st_mtime_ns)
                         for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        return hash_obj(entries)
    return "missing"


class Manifest:
    """work_dir/manifest.json: per stage, the input and settings hashes it ran with and its stats."""

    def __init__(self, work_dir: str | Path):
        self.path = Path(work_dir) / "manifest.json"
        self.data: dict = read_json(self.path, {})

    def fingerprint(self, inputs: list[str | Path], settings: Any) -> dict:
        return {"inputs": {str(p): hash_path(p) for p in inputs}, "settings": hash_obj(settings)}

    def is_fresh(self, stage: str, fingerprint: dict, outputs: list[str | Path]) -> bool:
        entry = self.data.get(stage)
        return (entry is not None and entry.get("fingerprint") == fingerprint
                and all(Path(o).exists() for o in outputs))

    def record(self, stage: str, fingerprint: dict, stats: dict) -> None:
        self.data[stage] = {"fingerprint": fingerprint, "stats": stats, "finished_at": time.time()}
        write_json(self.path, self.data)

    def stats(self, stage: str) -> dict:
        return self.data.get(stage, {}).get("stats", {})
