"""The teacher's limits: requests and tokens per minute, and `max_cost` (what an answer costs: `price_of`).

    limiter = RateLimiter(rpm=600, tpm=None); await limiter.acquire(est_tokens)
    if await budget.reserve(req, stopping): ...   # then send; `await budget.release(req)` when done

The Runner in `shifu.teach` holds one of each; they know nothing of retries or the store.
"""

from __future__ import annotations

import asyncio
import time

from shifu.config import Price
from shifu.teacher import Request


def is_peak(when: float) -> bool:
    """DeepSeek's peak hours: Beijing 9-12 and 14-18 (01-04, 06-10 UTC), Monday to Friday."""
    beijing = time.gmtime(when + 8 * 3600)
    return beijing.tm_wday < 5 and (9 <= beijing.tm_hour < 12 or 14 <= beijing.tm_hour < 18)


def price_of(usage: dict, price: Price | None, peak_pricing: bool, when: float | None = None) -> float | None:
    """Cost of one answer from its usage; DeepSeek reports cache hits and misses separately."""
    if price is None:
        return None
    peak = peak_pricing and is_peak(when if when is not None else time.time())
    pick = lambda off, on: on if (peak and on is not None) else off  # noqa: E731
    prompt = usage.get("prompt_tokens", 0) or 0
    hit = usage.get("prompt_cache_hit_tokens", 0) or 0
    miss = usage.get("prompt_cache_miss_tokens", prompt - hit) or 0
    # completion_tokens already holds the reasoning tokens (OpenAI's and DeepSeek's usage); a server
    # that reports more reasoning than completion counts them apart, and both are billed as output.
    out = usage.get("completion_tokens", 0) or 0
    reasoning = usage.get("reasoning_tokens", 0) or 0
    if reasoning > out:
        out += reasoning
    return (hit * pick(price.input_cache_hit, price.peak_input_cache_hit)
            + miss * pick(price.input_cache_miss, price.peak_input_cache_miss)
            + out * pick(price.output, price.peak_output)) / 1e6


class RateLimiter:
    """Token buckets for requests and tokens per minute, refilled continuously. A bucket holds one
    second's worth (or one request's need, when that is more), so a run never fires a whole
    minute's quota at once: any minute sees at most the limit plus one second's worth."""

    def __init__(self, rpm: float | None, tpm: float | None):
        self.rates = {k: v / 60 for k, v in (("req", rpm), ("tok", tpm)) if v}
        self.level = dict(self.rates)
        self.t = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self, need: dict) -> None:
        now = time.monotonic()
        for k, rate in self.rates.items():
            self.level[k] = min(max(rate, need[k]), self.level[k] + (now - self.t) * rate)
        self.t = now

    async def acquire(self, tokens: int) -> None:
        if not self.rates:
            return
        need = {"req": 1.0, "tok": float(tokens)}
        async with self.lock:  # FIFO: waiters are served in order
            while True:
                self._refill(need)
                wait = max((need[k] - self.level[k]) / rate for k, rate in self.rates.items())
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            for k in self.rates:
                self.level[k] -= need[k]

    def correct(self, estimated: int, actual: int) -> None:
        """Settle a request's token estimate against the usage the server reported."""
        if "tok" in self.rates:
            self.level["tok"] -= actual - estimated


# Worst-case prompt size for the budget: the character heuristic can undercount code, digits and
# the chat template the server wraps around the prompt, so reserve half as much again, plus a bit.
PROMPT_MARGIN, PROMPT_OVERHEAD = 1.5, 16


class Budget:
    """`max_cost`: no request starts that could take the spend (stored + in flight) over budget.
    Each request in flight holds its worst-case cost until its real cost is known."""

    def __init__(self, max_cost: float | None, price: Price | None, peak_pricing: bool, max_tokens: int,
                 spent: float):
        self.max_cost, self.price, self.peak_pricing, self.max_tokens = max_cost, price, peak_pricing, max_tokens
        self.enabled = max_cost is not None and price is not None
        self.spent = spent
        self.reserved, self.reservations = 0.0, 0
        self.changed = asyncio.Condition()

    def worst_cost(self, req: Request) -> float:
        prompt = int(req.est_prompt_tokens * PROMPT_MARGIN) + PROMPT_OVERHEAD
        usage = {"prompt_tokens": prompt, "completion_tokens": self.max_tokens}
        return price_of(usage, self.price, self.peak_pricing) or 0.0

    async def reserve(self, req: Request, stopping: asyncio.Event) -> bool:
        """Hold the request's worst case. While other requests are in flight, wait for them: they
        usually cost far less than reserved, which may leave room for this one. False: no room."""
        if not self.enabled:
            return True
        worst = self.worst_cost(req)
        async with self.changed:
            while self.spent + self.reserved + worst > self.max_cost:
                if self.reservations == 0 or stopping.is_set():
                    return False
                await self.changed.wait()
            self.reserved += worst
            self.reservations += 1
        return True

    async def release(self, req: Request) -> None:
        if not self.enabled:
            return
        async with self.changed:
            self.reserved -= self.worst_cost(req)
            self.reservations -= 1
            self.changed.notify_all()
