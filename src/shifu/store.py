"""Durable per-request results in SQLite (WAL), keyed by the hash of the request.

    store = Store("work/teacher.sqlite")
    if store.get(req.key) is None: ...   # only then is the request sent

An answer is committed before anything counts it or writes it to a dataset, so `kill -9` at any
moment loses at most the requests in flight, and a rerun sends only what has no stored answer.
WAL with synchronous=NORMAL survives a killed process; a power cut may lose the last commits,
which the next run then buys again rather than trusting a torn write.
Failed requests are stored with their reason and retried on the next run.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import time
from pathlib import Path

from shifu.errors import UserError
from shifu.records import StoredAnswer
from shifu.teacher import Answer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,            -- ok | failed
    content TEXT,
    finish_reason TEXT,
    flags TEXT,                      -- JSON list: truncated, empty, refusal
    usage TEXT,                      -- JSON object as the server reported it
    cost REAL,
    logprobs BLOB,                   -- shifu.logprobs.pack_logprobs
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    reasoning TEXT                   -- a thinking teacher's reasoning (added later: see _migrate)
)"""


class Store:
    """`with Store(path) as store:` closes it however the block ends."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(_SCHEMA)
            self._migrate()
        except (OSError, sqlite3.OperationalError) as err:
            raise self.write_error(err) from None

    def _migrate(self) -> None:
        """A store written before the reasoning column gets it (NULL: no reasoning), so it keeps working."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(answers)")}
        if "reasoning" not in columns:
            self.db.execute("ALTER TABLE answers ADD COLUMN reasoning TEXT")

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def write_error(self, err: Exception) -> UserError:
        """A full disk or a read-only folder, as one line that names the store and the fix."""
        text = str(err)
        if "full" in text or getattr(err, "errno", None) == errno.ENOSPC:
            fix = "free some space on that disk (or move work_dir), then rerun: every committed answer is kept"
        else:
            fix = "make it writable or set work_dir to a folder you can write, then rerun"
        return UserError(f"teacher store {self.path}: cannot write ({text}); {fix}")

    def get(self, key: str) -> StoredAnswer | None:
        """The stored answer for a key, or None when it has none yet (never asked, or failed)."""
        row = self.db.execute("SELECT content, finish_reason, flags, usage, cost, logprobs, reasoning FROM answers "
                              "WHERE key = ? AND status = 'ok'", (key,)).fetchone()
        if row is None:
            return None
        return {"content": row[0], "finish_reason": row[1], "flags": json.loads(row[2]),
                "usage": json.loads(row[3]), "cost": row[4], "logprobs": row[5], "reasoning": row[6] or ""}

    def logprobs(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT logprobs FROM answers WHERE key = ? AND status = 'ok'", (key,)).fetchone()
        return row[0] if row else None

    def ok_keys(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM answers WHERE status = 'ok'")}

    def put_ok(self, key: str, ans: Answer, cost: float | None, attempts: int) -> None:
        self.put_ok_many([(key, ans, cost, attempts)])

    def put_ok_many(self, rows: list[tuple[str, Answer, float | None, int]]) -> None:
        """Commit several answers in one transaction: all of them are on disk when this returns, or none."""
        now = time.time()
        values = [(key, ans.content, ans.finish_reason, json.dumps(ans.flags), json.dumps(ans.usage), cost,
                   ans.logprobs, attempts, now, ans.reasoning or None) for key, ans, cost, attempts in rows]
        try:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT OR REPLACE INTO answers (key, status, content, finish_reason, flags, "
                                    "usage, cost, logprobs, error, attempts, updated_at, reasoning) "
                                    "VALUES (?, 'ok', ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)", values)
                self.db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does): a second rollback would
                # raise "no transaction is active" and hide the real error.
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as err:
            raise self.write_error(err) from None

    def put_failed(self, key: str, reason: str, attempts: int) -> None:
        try:
            self._put_failed(key, reason, attempts)
        except sqlite3.OperationalError as err:
            raise self.write_error(err) from None

    def _put_failed(self, key: str, reason: str, attempts: int) -> None:
        # Never overwrite a good answer with a later failure.
        self.db.execute(
            "INSERT INTO answers (key, status, error, attempts, updated_at) VALUES (?, 'failed', ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET error = excluded.error, attempts = answers.attempts + excluded.attempts, "
            "updated_at = excluded.updated_at WHERE answers.status = 'failed'",
            (key, reason, attempts, time.time()))

    def totals(self) -> dict:
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM answers WHERE status = 'ok'").fetchone()
        failed = self.db.execute("SELECT COUNT(*) FROM answers WHERE status = 'failed'").fetchone()[0]
        return {"stored_answers": row[0], "stored_cost": row[1], "stored_failed": failed}
