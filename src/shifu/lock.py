"""One shifu process per work_dir: two teach runs on one store would buy every answer twice.

    with work_dir_lock(cfg.work, wait=False):
        ...   # this process alone writes work_dir

The lock is `fcntl.flock` on `<work_dir>/.lock`: the kernel releases it when its holder dies, so a
lock left by a `kill -9` never blocks the next run. The file holds who took it (pid, host, command,
since), only to name the holder in the error; its presence alone means nothing.
Re-entrant within a process: `shifu run` holds it around every stage it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from shifu.errors import UserError

_held: dict[str, int] = {}  # resolved lock path -> nesting depth in this process


def _holder(path: Path) -> str:
    try:
        who = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["since"]))
        return f"pid {who['pid']} on {who['host']} ({who['command']}), since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _under_launcher() -> bool:
    return any(k in os.environ for k in ("WORLD_SIZE", "LOCAL_RANK")) and int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def work_dir_lock(work_dir: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold work_dir for this process; another holder means a one-line error, or a wait if asked."""
    # Ranks of one torchrun / accelerate launch share the work_dir by design: rank 0 holds the lock
    # for all of them (it alone writes records), the others take none, or they would lock each other out.
    if _under_launcher() and int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = Path(work_dir) / ".lock"
    key = str(path.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, wait)
        os.ftruncate(fd, 0)
        who = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
               "since": time.time()}
        os.pwrite(fd, json.dumps(who).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _acquire(fd: int, path: Path, wait: bool) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        holder = _holder(path)
    if not wait:
        raise UserError(f"{path.parent} is in use by {holder}; wait for it to finish, pass --wait to queue "
                        "behind it, or give this run another work_dir")
    from shifu.progress import console

    console.print(f"waiting for {path.parent}, in use by {holder}", highlight=False)
    fcntl.flock(fd, fcntl.LOCK_EX)
