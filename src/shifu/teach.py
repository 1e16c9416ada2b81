"""Stage 3: the teacher answers every task, concurrently, within limits, exactly once.

    shifu teach configs/demo.yaml       # reads tasks.jsonl; answers land in <work_dir>/teacher.sqlite

Question-answering tasks take two rounds: the teacher proposes questions (JSON), and each question
is then answered in its own request, so that the answer, and its logprobs, are conditioned on the
very prompt the student will see. Answers are requested as soon as their questions arrive.

What the runner guarantees:
- bounded concurrency (`max_concurrency`) and optional requests- and tokens-per-minute limits;
- retries with exponential backoff and full jitter, never shorter than the server's Retry-After;
- fail fast on 400/401/402/403/404/422, and on a server that is not OpenAI-compatible (405, 501, a 2xx
  that is not a chat completion): nothing new is sent, in-flight answers are still saved;
- blank answers are asked again like any retryable fault, and stored as empty only after the last attempt;
- an unreachable server (requests failing on connection errors alone) ends the run with one line
  instead of thousands of futile retries; its requests are recorded as failed for the next run;
- every answer committed to the store before it is counted; stored answers are never re-sent;
- `max_cost`: no request is started that could take the spend (stored + in flight) over budget;
- a run that ends with failed or unsent requests fails the stage with their count, unless
  `teacher.allow_partial` accepts it (the summary then marks it partial).
Rate limits and the budget live in `shifu.limits`; group commit is a small class beside the Runner,
which queues and retries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from shifu.config import Config
from shifu.errors import TeacherError, UserError
from shifu.files import read_jsonl
from shifu.limits import Budget, RateLimiter, price_of
from shifu.records import StoredAnswer, Task
from shifu.store import Store
from shifu.tasks import (
    answer_requests,
    follow_up_answer_request,
    follow_up_question,
    follow_up_request,
    parse_questions,
    task_request,
)
from shifu.teacher import Answer, Request, Retryable, is_local, make_client

log = logging.getLogger("shifu")


class GroupCommit:
    """Answers that arrive in the same turn of the event loop share one SQLite transaction, flushed
    on the next turn; each caller resumes only once its answer is on disk. At hundreds of answers a
    second this halves the store's cost; alone, an answer waits for nothing, so durability is
    unchanged: what is not yet committed is lost like a request in flight."""

    def __init__(self, store: Store):
        self.store = store
        self.pending: list[tuple] = []

    async def commit(self, key: str, ans: Answer, cost: float | None, attempts: int) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending.append((key, ans, cost, attempts, done))
        if len(self.pending) == 1:
            loop.call_soon(self._flush)
        await done

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        try:
            self.store.put_ok_many([row[:4] for row in batch])
        except Exception as err:  # a full disk: every caller of this batch fails, and so does the run
            for row in batch:
                if not row[4].done():  # a caller cancelled meanwhile has no one to tell
                    row[4].set_exception(err)
            return
        for row in batch:
            if not row[4].done():
                row[4].set_result(None)


@dataclass
class Stats:
    planned: int = 0
    cached: int = 0
    sent: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    unsent: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # of completion_tokens, a thinking teacher's reasoning (teacher.thinking)
    cache_hit_tokens: int = 0
    cache_miss_tokens: int = 0
    cost: float = 0.0
    flags: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    retry_reasons: Counter = field(default_factory=Counter)
    malformed_questions: int = 0
    budget_stopped: bool = False
    logprobs_missing: int = 0


# ---- the runner ---------------------------------------------------------------------------------


class Runner:
    """Sends queued requests with `max_concurrency` workers; `add` may be called while it runs."""

    def __init__(self, cfg: Config, client, store: Store, on_progress: Callable[[Stats], None] = lambda s: None):
        self.cfg, self.tc, self.client, self.store = cfg, cfg.teacher, client, store
        self.stats = Stats()
        self.on_progress = on_progress
        self.limiter = RateLimiter(self.tc.requests_per_minute, self.tc.tokens_per_minute)
        price = self.tc.prices.get(self.tc.model) if self.tc.kind == "openai" else None
        if price is None and self.tc.kind == "openai" and not is_local(self.tc.base_url):
            log.warning("teacher.prices has no entry for '%s': costs are not counted; add one to see them",
                        self.tc.model)
        self.price = price
        if self.tc.max_cost is not None and self.tc.kind == "openai" and price is None:
            # shifu.config refuses this before any stage; a caller with a copied config (the judge) lands here.
            raise UserError(f"teacher.max_cost is set but teacher.prices has no entry for '{self.tc.model}'")
        self.budget = Budget(self.tc.max_cost, price, self.tc.peak_pricing, self.tc.max_tokens,
                             store.totals()["stored_cost"])
        self.commits = GroupCommit(store)
        self.fatal: TeacherError | None = None
        self.stopping = asyncio.Event()  # fatal error or unreachable server: nothing new is sent, backoffs end
        self.unreachable_streak = 0
        self.unreachable_reason = ""  # the last connection failure that ended a request
        self.unreachable_stop = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seen: set[str] = set()
        self.stored = store.ok_keys()  # one query up front instead of a lookup per new request

    def add(self, req: Request, then: Callable[[dict], None] | None = None) -> None:
        if req.key not in self.seen:
            self.seen.add(req.key)
            self.stats.planned += 1
            self.queue.put_nowait((req, then))

    async def run(self) -> Stats:
        workers = [asyncio.create_task(self._worker()) for _ in range(self.tc.max_concurrency)]
        joined = asyncio.create_task(self.queue.join())
        # Workers loop forever, so one that ends has crashed (a bug, a full disk): stop instead of
        # waiting for a queue that no one drains any more.
        done, _ = await asyncio.wait([joined, *workers], return_when=asyncio.FIRST_COMPLETED)
        for task in (joined, *workers):
            task.cancel()
        await asyncio.gather(joined, *workers, return_exceptions=True)
        for task in done:
            if task is not joined and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        # Stopped by the streak, or a run that never got through at all: say so, and fail.
        never = self.unreachable_streak > 0 and self.stats.done == 0
        if (self.unreachable_stop or never) and self.fatal is None:
            s = self.stats
            self.fatal = TeacherError(
                f"cannot reach the teacher: {self.unreachable_reason}; check teacher.base_url and that the "
                f"server is running ({s.failed} requests recorded as failed, to be retried)")
        if self.fatal is not None:
            s = self.stats
            raise TeacherError(f"{self.fatal} [{s.done} new answers stored, {s.unsent} requests not sent; "
                               f"once fixed, rerun the same command to continue]") from None
        return self.stats

    async def _worker(self) -> None:
        while True:
            req, then = await self.queue.get()
            try:
                stored = self.store.get(req.key) if req.key in self.stored else None
                if stored is not None:
                    self.stats.cached += 1
                elif self.stopping.is_set():
                    self.stats.unsent += 1
                elif not await self.budget.reserve(req, self.stopping):
                    self.stats.unsent += 1
                    self.stats.budget_stopped = True
                else:
                    stored = await self._send(req)
                if stored is not None and then is not None:
                    then(stored)
            finally:
                self.on_progress(self.stats)
                self.queue.task_done()

    def _stop(self, err: TeacherError) -> None:
        self.fatal = self.fatal or err
        self.stopping.set()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _send(self, req: Request) -> dict | None:
        est = req.est_prompt_tokens + int(self.tc.max_tokens * self.tc.expected_output_ratio)
        attempts, reason, unreachable = 0, "", False
        try:
            while attempts < self.tc.max_attempts and not self.stopping.is_set():
                await self.limiter.acquire(est)
                attempts += 1
                self.stats.sent += 1
                try:
                    ans = await self.client.complete(req)
                except Retryable as err:
                    reason, unreachable = err.reason, err.unreachable
                    self.stats.retry_reasons[err.reason.split(" (")[0]] += 1
                    if err.answer is not None and attempts == self.tc.max_attempts:
                        return await self._save(req, err.answer, attempts, est)  # blank every time: record it
                    if attempts < self.tc.max_attempts:
                        self.stats.retried += 1
                        await self._pause(self._backoff(attempts, err.retry_after))
                    continue
                except TeacherError as err:
                    self._stop(err)
                    reason, unreachable = "fatal: " + str(err), False
                    break
                return await self._save(req, ans, attempts, est)
        finally:
            await self.budget.release(req)
        self.store.put_failed(req.key, reason or "not attempted", attempts)
        self.stats.failed += 1
        self.stats.failures[reason.split(" (")[0]] += 1
        # Whole requests in a row failing because no connection can be made: the URL is wrong or
        # the server is down, and thousands more attempts would only delay saying so.
        self.unreachable_streak = self.unreachable_streak + 1 if unreachable else 0
        if unreachable:
            self.unreachable_reason = reason
        if self.unreachable_streak >= min(self.tc.max_concurrency, 16):
            self.unreachable_stop = True
            self.stopping.set()
        return None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter up to backoff_max_s; a server's Retry-After is a floor, never cut short."""
        delay = min(self.tc.backoff_max_s, random.uniform(0, self.tc.backoff_base_s * 2 ** (attempt - 1)))
        return max(delay, retry_after or 0.0)

    async def _save(self, req: Request, ans, attempts: int, est: int) -> dict:
        cost = price_of(ans.usage, self.price, self.tc.peak_pricing)
        await self.commits.commit(req.key, ans, cost, attempts)  # committed before it counts anywhere
        self.unreachable_streak = 0
        s, u = self.stats, ans.usage
        s.done += 1
        s.prompt_tokens += int(u.get("prompt_tokens", 0))
        s.completion_tokens += int(u.get("completion_tokens", 0))
        s.reasoning_tokens += int(u.get("reasoning_tokens", 0))
        s.cache_hit_tokens += int(u.get("prompt_cache_hit_tokens", 0))
        s.cache_miss_tokens += int(u.get("prompt_cache_miss_tokens", 0))
        s.cost += cost or 0.0
        self.budget.spent += cost or 0.0
        s.flags.update(ans.flags)
        self.limiter.correct(est, int(u.get("prompt_tokens", 0)) + int(u.get("completion_tokens", 0)))
        if req.params.get("top_logprobs") and ans.logprobs is None and ans.content.strip():
            if s.logprobs_missing == 0:
                log.warning("the teacher server returned no logprobs although teacher.top_logprobs=%d; "
                            "going on without them (distillation falls back to the teacher's text)",
                            self.tc.top_logprobs)
            s.logprobs_missing += 1
        return {"content": ans.content, "flags": ans.flags, "finish_reason": ans.finish_reason}


# ---- the stage ----------------------------------------------------------------------------------

def schedule(runner: Runner, tasks: list[Task], cfg: Config) -> None:
    """Queue every teacher task; a proposal's answer queues its re-ask or its questions' answers."""
    for task in tasks:
        if task["source"] != "teacher":
            continue
        if task["parse"] != "json_qa":
            runner.add(task_request(task, cfg))
            continue

        def on_questions(stored: StoredAnswer, task=task, reask: bool = False) -> None:
            try:
                questions = parse_questions(stored["content"], cfg.tasks.qa_per_chunk)
            except ValueError:
                if reask:
                    runner.stats.malformed_questions += 1
                else:
                    runner.add(task_request(task, cfg, reask=True), lambda s, t=task: on_questions(s, t, True))
                return
            for q, req in answer_requests(task, questions, cfg):
                runner.add(req, (lambda s, t=task, q=q, r=req: on_answer(s, t, q, r)) if cfg.tasks.follow_ups else None)

        def on_answer(stored: StoredAnswer, task: Task, question: str, req) -> None:
            """tasks.follow_ups: a clean answer gets a follow-up question, then its answer in context."""
            if stored["flags"] or not stored["content"].strip():
                return
            first, answer = req.messages[-1]["content"], stored["content"].strip()

            def on_follow_up(proposed: StoredAnswer) -> None:
                q2 = follow_up_question(proposed["content"])
                if q2 and not proposed["flags"]:
                    runner.add(follow_up_answer_request(first, answer, q2, cfg))

            runner.add(follow_up_request(task, question, answer, cfg), on_follow_up)

        runner.add(task_request(task, cfg), on_questions)


async def teach_async(cfg: Config, tasks: list[Task], on_progress=lambda s: None) -> Stats:
    with Store(cfg.store_path) as store:
        async with make_client(cfg.teacher) as client:
            runner = Runner(cfg, client, store, on_progress)
            schedule(runner, tasks, cfg)
            return await runner.run()


def _incomplete(stats: Stats, cfg: Config) -> str:
    """Why the run is not complete, as the one line that ends it; '' when it is."""
    if stats.failed == 0 and stats.unsent == 0:
        return ""
    parts = []
    if stats.failed:
        parts.append(f"{stats.failed} teacher requests failed "
                     f"({', '.join(f'{k}: {v}' for k, v in stats.failures.items())}); rerun to retry them")
    if stats.budget_stopped:
        parts.append(f"teacher.max_cost={cfg.teacher.max_cost} reached with {stats.unsent} requests not sent; "
                     "raise it and rerun to continue")
    elif stats.unsent:
        parts.append(f"{stats.unsent} requests not sent; rerun to send them")
    return "; ".join(parts)


def run_teach(cfg: Config) -> dict:
    from shifu.progress import teacher_progress

    tasks = list(read_jsonl(cfg.tasks_path))
    n_teacher = sum(t["source"] == "teacher" for t in tasks)
    n_qa = sum(t["source"] == "teacher" and t["parse"] == "json_qa" for t in tasks)
    expected = n_teacher + n_qa * cfg.tasks.qa_per_chunk
    t0 = time.time()
    if not n_teacher:
        Store(cfg.store_path).close()  # an empty store: the stage ran, later stages find its output
    with teacher_progress(expected, cfg) as on_progress:
        stats = asyncio.run(teach_async(cfg, tasks, on_progress)) if n_teacher else Stats()
    out = {k: v for k, v in vars(stats).items() if not isinstance(v, Counter)}
    incomplete = _incomplete(stats, cfg)
    out.update(flags=dict(stats.flags), failures=dict(stats.failures), retry_reasons=dict(stats.retry_reasons),
               seconds=round(time.time() - t0, 2), complete=not incomplete, partial=bool(incomplete))
    out["cost"] = round(stats.cost, 6)
    if incomplete and cfg.teacher.allow_partial:
        log.warning("partial teacher run accepted (teacher.allow_partial): %s", incomplete)
    elif incomplete:  # the pipeline records the figures, then stops with this line
        out["incomplete"] = incomplete + " (or set teacher.allow_partial: true to go on with the answers stored)"
    return out
