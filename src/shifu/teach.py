"""Stage 3: the teacher answers every task, concurrently, within limits, exactly once.

    shifu teach configs/demo.yaml       # reads tasks.jsonl; answers land in <work_dir>/teacher.sqlite

Question-answering tasks take two rounds: the teacher proposes questions (JSON), and each question
is then answered in its own request, so that the answer, and its logprobs, are conditioned on the
very prompt the student will see. Answers are requested as soon as their questions arrive.

What the runner guarantees:
- bounded concurrency (`max_concurrency`) and optional requests- and tokens-per-minute limits;
- retries with exponential backoff and full jitter, never shorter than the server's Retry-After;
- fail fast on 400/401/402/403/404/422: nothing new is sent, in-flight answers are still saved;
- every answer committed to the store before it is counted; stored answers are never re-sent;
- `max_cost`: no request is started that could take the spend (stored + in flight) over budget.
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
from shifu.errors import TeacherError
from shifu.files import read_jsonl
from shifu.store import Store
from shifu.tasks import format_prompt, parse_questions, qa_answer_task
from shifu.teacher import Request, Retryable, make_client, price_of

log = logging.getLogger("shifu")

REASK = {"zh": "\n\n只输出一个 JSON 对象，不要输出其他内容。", "en": "\n\nOutput a single JSON object and nothing else."}


# ---- planning (pure) ----------------------------------------------------------------------------

def task_request(task: dict, cfg: Config, reask: bool = False) -> Request:
    prompt = format_prompt(task["instruction"], task["input"])
    json_qa = task["parse"] == "json_qa"
    if reask:
        prompt += REASK[task["lang"]]
    return Request.build(cfg.teacher, prompt, json_mode=json_qa, logprobs=not json_qa)


def answer_requests(task: dict, questions: list[str], cfg: Config) -> list[tuple[str, Request]]:
    out = []
    for q in questions:
        instruction, input_ = qa_answer_task(task, q, cfg)
        out.append((q, Request.build(cfg.teacher, format_prompt(instruction, input_))))
    return out


def questions_for(task: dict, cfg: Config, get: Callable[[str], dict | None]) -> tuple[list[str] | None, str]:
    """Questions from the stored proposal, or its re-ask; (None, reason) when neither parses yet."""
    reason = "no stored proposal"
    for reask in (False, True):
        stored = get(task_request(task, cfg, reask).key)
        if stored is None:
            return None, reason
        try:
            return parse_questions(stored["content"], cfg.tasks.qa_per_chunk), ""
        except ValueError as err:
            reason = f"malformed questions: {err}"
    return None, reason


# ---- limits -------------------------------------------------------------------------------------

class RateLimiter:
    """Token buckets for requests and tokens per minute; both refill continuously."""

    def __init__(self, rpm: float | None, tpm: float | None):
        self.limits = {"req": rpm, "tok": tpm}
        self.level = {k: (v or 0.0) for k, v in self.limits.items()}
        self.t = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        for k, cap in self.limits.items():
            if cap:
                self.level[k] = min(cap, self.level[k] + (now - self.t) * cap / 60)
        self.t = now

    async def acquire(self, tokens: int) -> None:
        need = {"req": 1.0, "tok": float(tokens)}
        async with self.lock:
            while True:
                self._refill()
                waits = [(min(need[k], cap) - self.level[k]) * 60 / cap
                         for k, cap in self.limits.items() if cap and self.level[k] < min(need[k], cap)]
                if not waits:
                    break
                await asyncio.sleep(max(waits))
            for k, cap in self.limits.items():
                if cap:
                    self.level[k] -= min(need[k], cap)

    def correct(self, estimated: int, actual: int) -> None:
        if self.limits["tok"]:
            self.level["tok"] -= actual - estimated


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
    def __init__(self, cfg: Config, client, store: Store, on_progress: Callable[[Stats], None] = lambda s: None):
        self.cfg, self.tc, self.client, self.store = cfg, cfg.teacher, client, store
        self.stats = Stats()
        self.on_progress = on_progress
        self.limiter = RateLimiter(self.tc.requests_per_minute, self.tc.tokens_per_minute)
        self.price = self.tc.prices.get(self.tc.model) if self.tc.kind == "openai" else None
        self.spent = store.totals()["stored_cost"]
        self.reserved = 0.0
        self.fatal: TeacherError | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seen: set[str] = set()

    def add(self, req: Request, then: Callable[[dict], None] | None = None) -> None:
        if req.key not in self.seen:
            self.seen.add(req.key)
            self.stats.planned += 1
            self.queue.put_nowait((req, then))

    async def run(self) -> Stats:
        workers = [asyncio.create_task(self._worker()) for _ in range(self.tc.max_concurrency)]
        await self.queue.join()
        for w in workers:
            w.cancel()
        if self.fatal is not None:
            raise self.fatal
        return self.stats

    async def _worker(self) -> None:
        while True:
            req, then = await self.queue.get()
            try:
                stored = self.store.get(req.key)
                if stored is not None:
                    self.stats.cached += 1
                elif self.fatal is not None or not self._reserve(req):
                    self.stats.unsent += 1
                else:
                    stored = await self._send(req)
                if stored is not None and then is not None:
                    then(stored)
            finally:
                self.on_progress(self.stats)
                self.queue.task_done()

    def _worst_cost(self, req: Request) -> float:
        usage = {"prompt_tokens": req.est_prompt_tokens, "completion_tokens": self.tc.max_tokens}
        return price_of(usage, self.price, self.tc.peak_pricing) or 0.0

    def _reserve(self, req: Request) -> bool:
        if self.tc.max_cost is None or self.price is None:
            return True
        worst = self._worst_cost(req)
        if self.spent + self.reserved + worst > self.tc.max_cost:
            self.stats.budget_stopped = True
            return False
        self.reserved += worst
        return True

    async def _send(self, req: Request) -> dict | None:
        est = req.est_prompt_tokens + int(self.tc.max_tokens * self.tc.expected_output_ratio)
        attempts, reason = 0, ""
        try:
            while attempts < self.tc.max_attempts and self.fatal is None:
                await self.limiter.acquire(est)
                attempts += 1
                self.stats.sent += 1
                try:
                    ans = await self.client.complete(req)
                except Retryable as err:
                    reason = err.reason
                    self.stats.retry_reasons[err.reason.split(" (")[0]] += 1
                    if attempts < self.tc.max_attempts:
                        self.stats.retried += 1
                        await asyncio.sleep(self._backoff(attempts, err.retry_after))
                    continue
                except TeacherError as err:
                    self.fatal = self.fatal or err
                    reason = "fatal: " + str(err)
                    break
                return self._save(req, ans, attempts, est)
        finally:
            self.reserved -= self._worst_cost(req) if self.tc.max_cost is not None and self.price else 0.0
        self.store.put_failed(req.key, reason or "not attempted", attempts)
        self.stats.failed += 1
        self.stats.failures[reason.split(" (")[0]] += 1
        return None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = random.uniform(0, self.tc.backoff_base_s * 2 ** (attempt - 1))
        return min(self.tc.backoff_max_s, max(delay, retry_after or 0.0))

    def _save(self, req: Request, ans, attempts: int, est: int) -> dict:
        cost = price_of(ans.usage, self.price, self.tc.peak_pricing)
        self.store.put_ok(req.key, ans, cost, attempts)  # committed before it counts anywhere
        s, u = self.stats, ans.usage
        s.done += 1
        s.prompt_tokens += int(u.get("prompt_tokens", 0))
        s.completion_tokens += int(u.get("completion_tokens", 0))
        s.cache_hit_tokens += int(u.get("prompt_cache_hit_tokens", 0))
        s.cache_miss_tokens += int(u.get("prompt_cache_miss_tokens", 0))
        s.cost += cost or 0.0
        self.spent += cost or 0.0
        s.flags.update(ans.flags)
        self.limiter.correct(est, int(u.get("prompt_tokens", 0)) + int(u.get("completion_tokens", 0)))
        if req.params.get("top_logprobs") and ans.logprobs is None:
            if s.logprobs_missing == 0:
                log.warning("the teacher server returned no logprobs although teacher.top_logprobs=%d; "
                            "going on without them (distillation falls back to the teacher's text)",
                            self.tc.top_logprobs)
            s.logprobs_missing += 1
        return {"content": ans.content, "flags": ans.flags, "finish_reason": ans.finish_reason}


# ---- the stage ----------------------------------------------------------------------------------

def schedule(runner: Runner, tasks: list[dict], cfg: Config) -> None:
    """Queue every teacher task; a proposal's answer queues its re-ask or its questions' answers."""
    for task in tasks:
        if task["source"] != "teacher":
            continue
        if task["parse"] != "json_qa":
            runner.add(task_request(task, cfg))
            continue

        def on_questions(stored: dict, task=task, reask: bool = False) -> None:
            try:
                questions = parse_questions(stored["content"], cfg.tasks.qa_per_chunk)
            except ValueError:
                if reask:
                    runner.stats.malformed_questions += 1
                else:
                    runner.add(task_request(task, cfg, reask=True), lambda s, t=task: on_questions(s, t, True))
                return
            for _, req in answer_requests(task, questions, cfg):
                runner.add(req)

        runner.add(task_request(task, cfg), on_questions)


async def teach_async(cfg: Config, tasks: list[dict], on_progress=lambda s: None) -> Stats:
    store = Store(cfg.work / "teacher.sqlite")
    try:
        async with make_client(cfg.teacher) as client:
            runner = Runner(cfg, client, store, on_progress)
            schedule(runner, tasks, cfg)
            return await runner.run()
    finally:
        store.close()


def run_teach(cfg: Config) -> dict:
    from shifu.progress import teacher_progress

    tasks = list(read_jsonl(cfg.work / "tasks.jsonl"))
    n_teacher = sum(t["source"] == "teacher" for t in tasks)
    n_qa = sum(t["source"] == "teacher" and t["parse"] == "json_qa" for t in tasks)
    expected = n_teacher + n_qa * cfg.tasks.qa_per_chunk
    t0 = time.time()
    with teacher_progress(expected, cfg) as on_progress:
        stats = asyncio.run(teach_async(cfg, tasks, on_progress)) if n_teacher else Stats()
    out = {k: v for k, v in vars(stats).items() if not isinstance(v, Counter)}
    out.update(flags=dict(stats.flags), failures=dict(stats.failures), retry_reasons=dict(stats.retry_reasons),
               seconds=round(time.time() - t0, 2), complete=stats.failed == 0 and stats.unsent == 0)
    out["cost"] = round(stats.cost, 6)
    if stats.failed:
        log.warning("%d teacher requests failed (%s); rerun the same command to retry them",
                    stats.failed, ", ".join(f"{k}: {v}" for k, v in stats.failures.items()))
    if stats.budget_stopped:
        log.warning("teacher.max_cost=%s reached: %d requests were not sent; raise it and rerun to continue",
                    cfg.teacher.max_cost, stats.unsent)
    return out
