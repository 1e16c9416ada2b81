"""A fault-injecting OpenAI-compatible chat server on 127.0.0.1, for tests and benchmarks.

    python -m shifu.fake_openai --port 8011 --latency 0.2 --fault-rate 0.2 --lifetime 600
    with FakeServer(fault_rate=0.3) as server: ...   # server.url, server.requests_by_key

Answers are deterministic functions of the prompt: JSON mode returns {"questions": [...]}, other
requests a short text made of the prompt's own characters, so quality checks pass; a judge prompt
(one that names the markers [[A]], [[B]] and [[C]]) gets one of them. With
`top_logprobs` it returns per-token logprobs (characters, or a real tokenizer's tokens when
`tokenizer` names a folder). Faults, drawn per request at `fault_rate`, from `faults`:
  429 (with Retry-After), 500, 502, 503, 504, timeout (sleeps past the client's timeout), reset
  (connection dropped), truncated (body cut short), invalid (not JSON), blank_json (blank content
  in JSON mode), keepalive (blank lines and ': keep-alive' before the body; a valid answer),
  empty (blank answer), length (cut at max_tokens), refusal.
`fault_first=N` instead faults the first N requests of every distinct request, then answers it:
deterministic, so a test can check that each fault is retried (or flagged) and then stored.
`fatal_status` answers every request after the first `fatal_after` with that status (401, 402,
404, ...), at once, without the latency: requests already in flight still get their answers.
`no_logprobs` ignores `logprobs` as some servers do. `wrong_api` plays a server that is not
OpenAI-compatible (404, 405, 501, "html" or "json" with 200). `arrivals` lists (monotonic time, key).
`reasoning_field` ("reasoning_content" as DeepSeek, or "reasoning") plays a thinking teacher: a
short reasoning under that field, counted in usage.completion_tokens_details.reasoning_tokens; the
extra fault cut_reasoning (never drawn unless listed in `faults`) stops it at max_tokens while still
reasoning. `refuse_logprobs` answers 400 to any request asking for logprobs, as some thinking servers do.
It binds 127.0.0.1 only and stops itself after `lifetime` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter

from aiohttp import web

FAULTS = ["429", "500", "502", "503", "504", "timeout", "reset", "truncated", "invalid", "blank_json",
          "keepalive", "empty", "length", "refusal"]
EXTRA_FAULTS = ["cut_reasoning"]  # only when asked for by name
KEEPALIVE = b"\n\n: keep-alive\n\n\n\n"  # what DeepSeek sends while a busy request waits
JUDGE_MARKERS = ("[[A]]", "[[B]]", "[[C]]")  # shifu.judge's verdicts


class FakeBackend:
    def __init__(self, latency: float = 0.0, fault_rate: float = 0.0, faults: list[str] | None = None,
                 fatal_status: int | None = None, seed: int = 0, tokenizer: str | None = None,
                 timeout_sleep: float = 30.0, fault_first: int = 0, retry_after: str = "0",
                 fatal_after: int = 0, no_logprobs: bool = False, echo_key: bool = False,
                 wrong_api: int | str | None = None, reasoning_field: str | None = None,
                 refuse_logprobs: bool = False):
        self.latency, self.fault_rate, self.fatal_status = latency, fault_rate, fatal_status
        self.faults = faults or FAULTS
        unknown = set(self.faults) - set(FAULTS) - set(EXTRA_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {','.join(FAULTS)}")
        self.fault_first, self.retry_after, self.fatal_after = fault_first, retry_after, fatal_after
        self.no_logprobs = no_logprobs
        self.reasoning_field, self.refuse_logprobs = reasoning_field, refuse_logprobs
        self.wrong_api = wrong_api  # not a chat-completions server at all (see _wrong_api)
        self.echo_key = echo_key  # a careless server that quotes the key back in its 401 body
        self.rng = random.Random(seed)
        self.timeout_sleep = timeout_sleep
        self.tok = None
        if tokenizer:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(tokenizer)
        self.requests_by_key: Counter = Counter()  # every request received, by request hash
        self.answered_by_key: Counter = Counter()  # requests answered with a 200 and a valid body
        self.faults_sent: Counter = Counter()
        self.auth_headers: list[str] = []
        self.arrivals: list[tuple[float, str]] = []
        self.received = 0

    # -- content --------------------------------------------------------------------------------
    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def content(self, body: dict, key: str | None = None) -> str:
        prompt = body["messages"][-1]["content"]
        r = random.Random(key or self.key(body))
        if all(m in prompt for m in JUDGE_MARKERS):  # a pairwise judge prompt (shifu.judge): one marker
            return r.choice(JUDGE_MARKERS)
        if (body.get("response_format") or {}).get("type") == "json_object":
            n = int(m.group(1)) if (m := re.search(r"(\d+)", prompt)) else 2
            words = re.findall(r"[\u4e00-\u9fff]{2,4}|[A-Za-z]{4,}", prompt) or ["text"]
            return json.dumps({"questions": [f"{r.choice(words)}{r.choice(words)}是什么？" if _zh(prompt)
                                             else f"What is {r.choice(words)} {r.choice(words)}?" for _ in range(n)]},
                              ensure_ascii=False)
        # One choices() call, not a choice() per character: the server must stay cheap next to the
        # client it is benchmarking on the same cores.
        han = _HAN.findall(prompt)
        if _zh(prompt, han):
            return "".join(r.choices(han or list("文字"), k=r.randint(24, 60))) + "。"
        words = re.findall(r"[A-Za-z]+", prompt) or ["word"]
        return " ".join(r.choices(words, k=r.randint(12, 30))).capitalize() + "."

    def tokens(self, text: str) -> list[tuple[str, bytes]]:
        if self.tok is None:
            return [(c, c.encode()) for c in text]
        from shifu.models import token_bytes_table

        table = token_bytes_table(self.tok)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return [(table[i].decode("utf-8", "replace"), table[i]) for i in ids]

    def logprobs(self, body: dict, text: str) -> dict:
        r = random.Random(self.key(body) + "lp")
        k = int(body.get("top_logprobs") or 0)
        vocab = [t for t in set(text)] or ["a"]
        entries = []
        for tok_s, tok_b in self.tokens(text):
            chosen = -r.uniform(0.01, 1.5)
            alts = [{"token": tok_s, "logprob": chosen, "bytes": list(tok_b)}]
            for j in range(1, k):
                alt = r.choice(vocab) + str(j)
                alts.append({"token": alt, "logprob": chosen - 1.0 - j * 0.5, "bytes": list(alt.encode())})
            entries.append({"token": tok_s, "logprob": chosen, "bytes": list(tok_b), "top_logprobs": alts[:k]})
        return {"content": entries}

    def answer(self, body: dict, fault: str | None, key: str | None = None) -> dict:
        key = key or self.key(body)
        text = self.content(body, key)
        finish = "stop"
        if fault == "empty":
            text = ""
        elif fault == "length":
            text, finish = text[: max(1, len(text) // 2)], "length"
        elif fault == "refusal":
            text = "抱歉，我无法回答这个问题。" if _zh(text) else "I'm sorry, but I can't help with that."
        elif fault == "blank_json" and body.get("response_format"):
            text = ""
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        thought = ""
        if self.reasoning_field:
            thought = ("Let me think. " + text[: max(1, len(text) // 3)]) if text else "Let me think."
            if fault == "cut_reasoning":
                thought, text, finish = thought[: len(thought) // 2], "", "length"
                choice.update(message={"role": "assistant", "content": text}, finish_reason=finish)
            choice["message"][self.reasoning_field] = thought
        if body.get("logprobs") and body.get("top_logprobs") is not None and not self.no_logprobs:
            choice["logprobs"] = self.logprobs(body, text)
        prompt_tokens = len(body["messages"][-1]["content"]) // 2 + 8
        hit = prompt_tokens // 3
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max(1, (len(text) + len(thought)) // 2),
                 "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt_tokens - hit}
        if thought:
            usage["completion_tokens_details"] = {"reasoning_tokens": max(1, len(thought) // 2)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": "fake-" + key[:12], "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "choices": [choice], "usage": usage}

    # -- HTTP -----------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = self.key(body)
        self.requests_by_key[key] += 1
        self.received += 1
        self.arrivals.append((time.monotonic(), key))
        auth = request.headers.get("Authorization", "")
        self.auth_headers.append(auth)
        if self.wrong_api is not None:
            return self._wrong_api()
        if self.fatal_status and self.received > self.fatal_after:
            message = f"fake fatal error for {auth}" if self.echo_key else "fake fatal error"
            return web.json_response({"error": {"message": message, "type": "fake"}}, status=self.fatal_status)
        if self.refuse_logprobs and body.get("logprobs"):
            return web.json_response({"error": {"message": "logprobs is not supported in thinking mode",
                                                "type": "invalid_request_error"}}, status=400)
        if self.latency:
            await asyncio.sleep(self.latency)
        fault = self._draw_fault(key)
        if fault:
            self.faults_sent[fault] += 1
        if fault in ("429", "500", "502", "503", "504"):
            headers = {"Retry-After": self.retry_after} if fault == "429" else {}
            return web.json_response({"error": {"message": f"fake {fault}"}}, status=int(fault), headers=headers)
        if fault == "timeout":
            await asyncio.sleep(self.timeout_sleep)
        if fault == "reset":
            request.transport.abort()
            return web.Response(status=500)
        payload = json.dumps(self.answer(body, fault, key), ensure_ascii=False).encode()
        if fault == "invalid":
            return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        if fault in ("truncated", "keepalive"):
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(payload) + (len(KEEPALIVE) if fault == "keepalive" else 0)
            await resp.prepare(request)
            if fault == "truncated":
                await resp.write(payload[: len(payload) // 2])
                request.transport.abort()
                return resp
            await resp.write(KEEPALIVE)
            await asyncio.sleep(0.01)
            await resp.write(payload)
            await resp.write_eof()
            self._answered(key, fault, body)
            return resp
        self._answered(key, fault, body)
        return web.Response(body=payload, content_type="application/json")

    def _wrong_api(self) -> web.Response:
        """What a server that is not OpenAI-compatible answers to POST /chat/completions: a status
        (404, 405, 501 as Python's http.server), a web page, or some other API's JSON, all with 2xx."""
        if self.wrong_api == "html":
            return web.Response(text="<!doctype html><html><body>Welcome</body></html>", content_type="text/html")
        if self.wrong_api == "json":
            return web.json_response({"status": "ok", "version": "1.0"})
        return web.Response(text=f"Error {self.wrong_api}", status=int(self.wrong_api), content_type="text/html")

    def _draw_fault(self, key: str) -> str | None:
        if self.fault_first:
            if self.requests_by_key[key] > self.fault_first:
                return None
            return self.faults[(self.requests_by_key[key] - 1) % len(self.faults)]
        return self.rng.choice(self.faults) if self.rng.random() < self.fault_rate else None

    def _answered(self, key: str, fault: str | None, body: dict) -> None:
        if not (fault == "blank_json" and body.get("response_format")):  # blank_json spares plain requests
            self.answered_by_key[key] += 1

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/chat/completions", self.handle)
        return app


_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")


def _zh(text: str, han: list[str] | None = None) -> bool:
    n_han = len(_HAN.findall(text) if han is None else han)
    return n_han >= 0.2 * max(1, n_han + len(_LATIN.findall(text)))


class FakeServer:
    """The backend served from a background thread; a context manager that always stops it."""

    def __init__(self, lifetime: float = 900.0, **backend_kwargs):
        self.backend = FakeBackend(**backend_kwargs)
        self.lifetime = lifetime
        self._ready = threading.Event()
        self.port = 0

    def __enter__(self) -> "FakeServer":
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("fake server did not start")
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:  # its lifetime ran out first (a slow machine): the loop is closed already
            pass
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        # A short shutdown: handlers still sleeping out a 'timeout' fault must not hold up the exit.
        runner = web.AppRunner(self.backend.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await asyncio.wait_for(self._stop.wait(), self.lifetime)
        except asyncio.TimeoutError:
            pass
        await runner.cleanup()
        # Handlers still sleeping out a 'timeout' fault: end them here, not as warnings at exit.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--fault-first", type=int, default=0, help="fault the first N requests of each distinct request")
    p.add_argument("--retry-after", default="0", help="Retry-After header value sent with 429")
    p.add_argument("--fatal-status", type=int)
    p.add_argument("--fatal-after", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer")
    p.add_argument("--lifetime", type=float, default=900.0, help="stop after this many seconds")
    a = p.parse_args()
    server = FakeServer(lifetime=a.lifetime, latency=a.latency, fault_rate=a.fault_rate,
                        faults=a.faults.split(","), fatal_status=a.fatal_status, tokenizer=a.tokenizer,
                        fault_first=a.fault_first, retry_after=a.retry_after, fatal_after=a.fatal_after, seed=a.seed)
    server.port = a.port
    with server:
        print(f"fake OpenAI server on {server.url} for {a.lifetime:.0f}s", flush=True)
        server.thread.join()


if __name__ == "__main__":
    main()
