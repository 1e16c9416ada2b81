"""Teacher backends behind one tiny async contract: `await client.complete(request) -> Answer`.

    async with make_client(cfg.teacher) as client:
        answer = await client.complete(Request.build(cfg.teacher, "你好"))

`OpenAIClient` speaks to any OpenAI-compatible /chat/completions server (DeepSeek, vLLM,
llama.cpp) over aiohttp, one attempt per call; it raises `Retryable` for what a retry may fix
(429, 5xx, timeouts, resets, truncated or invalid bodies, blank answers) and `TeacherError` for what
it cannot (400, 401, 402, 403, 404, 422; 405, 501 or a 2xx that is not a chat completion: a wrong
base_url), with a line that says what to do.
`LocalClient` generates in-process with a Hugging Face model, batching concurrent calls.
Retries and storage live in `shifu.teach`, rate limits, budgets and prices in `shifu.limits`; this module
only talks. Top-k logprobs are packed compactly by `shifu.logprobs`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlparse

from shifu.config import TeacherConfig
from shifu.errors import TeacherError, UserError
from shifu.logprobs import pack_logprobs

log = logging.getLogger("shifu")


@dataclass
class Request:
    key: str
    messages: list[dict]
    params: dict
    est_prompt_tokens: int

    @staticmethod
    def build(tc: TeacherConfig, prompt: str, json_mode: bool = False, logprobs: bool = True,
              history: list[dict] | None = None) -> "Request":
        """`history`: earlier turns of the conversation (user and assistant messages) before `prompt`."""
        messages = [*(history or []), {"role": "user", "content": prompt}]
        params: dict[str, Any] = {"temperature": tc.temperature, "max_tokens": tc.max_tokens,
                                  **thinking_body(tc.extra_body, tc.thinking)}
        if tc.top_p is not None:
            params["top_p"] = tc.top_p
        if json_mode and tc.json_mode:
            params["response_format"] = {"type": "json_object"}
        if logprobs and tc.top_logprobs > 0:
            params.update(logprobs=True, top_logprobs=tc.top_logprobs)
        # The key covers everything that changes the answer, so the same request is never bought twice.
        key = hashlib.sha256(json.dumps([tc.base_url.rstrip("/"), tc.model, messages, params],
                                        sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return Request(key, messages, params, estimate_tokens("".join(m["content"] for m in messages)))


def thinking_body(extra: dict, thinking: bool) -> dict:
    """extra_body, with DeepSeek's thinking switch (and vLLM's enable_thinking) turned on when asked;
    a server without a switch in extra_body is left to think or not as it does by default."""
    if not thinking:
        return extra
    out = dict(extra)
    if "thinking" in out:
        out["thinking"] = {"type": "enabled"}
    if isinstance(out.get("chat_template_kwargs"), dict) and "enable_thinking" in out["chat_template_kwargs"]:
        out["chat_template_kwargs"] = {**out["chat_template_kwargs"], "enable_thinking": True}
    return out


@dataclass
class Answer:
    content: str
    finish_reason: str
    usage: dict = field(default_factory=dict)
    logprobs: bytes | None = None
    flags: list[str] = field(default_factory=list)
    reasoning: str = ""  # the chain of thought of a thinking teacher (teacher.thinking)


class Retryable(Exception):
    """A failure a retry may fix. `unreachable`: no connection could be made at all (refused, DNS),
    which the runner treats as a wrong base_url or a server that is down once it persists.
    `answer`: what came back (a blank answer), to be stored as final once the attempts are spent."""

    def __init__(self, reason: str, retry_after: float | None = None, unreachable: bool = False,
                 answer: "Answer | None" = None):
        super().__init__(reason)
        self.reason, self.retry_after, self.unreachable, self.answer = reason, retry_after, unreachable, answer


def estimate_tokens(text: str) -> int:
    """Rough count without a tokenizer: ~1 token per CJK character, ~4 Latin characters per token."""
    cjk = len(re.findall(r"[\u3000-\u9fff\uff00-\uffef]", text))
    return cjk + (len(text) - cjk) // 4 + 4


# ---- answer checks ------------------------------------------------------------------------------

_REFUSAL = re.compile(r"^\s*(抱歉|对不起|很抱歉)[，,].{0,12}(无法|不能|不便)|作为一个?(AI|人工智能|语言模型)|"
                      r"^\s*I(?:'m| am) sorry,? but I (?:can(?:no|')t|am unable)|^\s*I can(?:no|')t (?:help|assist) with",
                      re.IGNORECASE)


def answer_flags(content: str, finish_reason: str, refusal: Any = None, reasoning: str | None = None) -> list[str]:
    """Why an answer is unfit to train on. `reasoning` is given for a thinking teacher only: then a
    cut-off thought, a missing one, and a thought that never reached an answer are flagged too."""
    if reasoning is not None and not content.strip():
        if reasoning.strip():
            return ["truncated_reasoning" if finish_reason == "length" else "no_answer"]
        return ["truncated", "empty", "empty_reasoning"] if finish_reason == "length" else ["empty", "empty_reasoning"]
    flags = []
    if reasoning is not None and not reasoning.strip():
        flags.append("empty_reasoning")
    if finish_reason == "length":
        flags.append("truncated")
    if not content.strip():
        flags.append("empty")
    elif refusal or _REFUSAL.search(content[:200]):
        flags.append("refusal")
    return flags


# ---- OpenAI-compatible HTTP ---------------------------------------------------------------------

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_WRONG_API = ("teacher.base_url ({url}) is not an OpenAI-compatible server: it does not answer POST "
              "<base_url>/chat/completions; set it to the server's API root, e.g. http://host:8000/v1")
_FATAL_HINT = {
    400: "the server rejected the request as malformed; check teacher.extra_body, teacher.max_tokens and the prompt length",
    401: "authentication failed; check the key in the environment variable named by teacher.api_key_env ({env})",
    402: "insufficient balance; top up your account",
    403: "forbidden; the key may lack access to teacher.model or the region is blocked",
    404: ("not found; teacher.base_url ({url}) may not be an OpenAI-compatible API root (e.g. http://host:8000/v1), "
          "or teacher.model ({model}) is unknown there"),
    405: _WRONG_API,
    501: _WRONG_API,
    422: "invalid parameters; check teacher.temperature, teacher.top_p, teacher.top_logprobs and teacher.extra_body",
}


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def parse_body(text: str) -> dict:
    """JSON body after any blank lines or ': keep-alive' comments a busy server sent first."""
    lines = text.splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith(":")):
        lines.pop(0)
    try:
        body = json.loads("\n".join(lines))
    except json.JSONDecodeError:
        raise Retryable("invalid or truncated JSON body") from None
    if not isinstance(body, dict):
        raise Retryable("response body is not a JSON object")
    return body


def is_local(url: str) -> bool:
    return (urlparse(url).hostname or "") in {"127.0.0.1", "localhost", "::1"}


class OpenAIClient:
    def __init__(self, tc: TeacherConfig):
        self.tc = tc
        self.url = tc.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(tc.api_key_env, "").strip()
        if not key and not is_local(tc.base_url):
            raise UserError(f"environment variable {tc.api_key_env} is not set; export your API key there "
                            f"(or set teacher.api_key_env to the variable that holds it)")
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._key = key
        self.session = None
        self.logprobs_refused = False  # a thinking server that answers 400 to logprobs: asked without them

    async def __aenter__(self) -> "OpenAIClient":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.tc.max_concurrency, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                             timeout=aiohttp.ClientTimeout(total=self.tc.timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text

    def _fatal(self, status: int, body: str) -> TeacherError:
        detail = self._scrub(body.strip().replace("\n", " "))[:200]
        if detail.startswith("<"):  # a web server's error page: its markup says nothing more
            detail = "an HTML page"
        hint = _FATAL_HINT.get(status, "the server refused the request")
        if status in (400, 404) and re.search(r"model.{0,20}(not exist|not found|does not exist|unknown)", detail, re.I):
            hint = "teacher.model ({model}) is unknown to the server; set teacher.model to a model it serves"
        hint = hint.format(env=self.tc.api_key_env, url=self.tc.base_url, model=self.tc.model)
        return TeacherError(f"teacher HTTP {status}: {hint} (server said: {detail})")

    async def complete(self, req: Request) -> Answer:
        import aiohttp

        params = req.params
        if self.logprobs_refused:
            params = {k: v for k, v in params.items() if k not in ("logprobs", "top_logprobs")}
        payload = {"model": self.tc.model, "messages": req.messages, **params}
        try:
            async with self.session.post(self.url, json=payload) as resp:
                text = await resp.text()
                status, retry_after = resp.status, _retry_after(resp.headers.get("Retry-After"))
                content_type = resp.headers.get("Content-Type", "").lower()
        except asyncio.TimeoutError:
            raise Retryable("timeout") from None
        except aiohttp.ClientConnectorError as err:
            raise Retryable(f"cannot connect to {self.tc.base_url} ({type(err).__name__})", unreachable=True) from None
        except (aiohttp.ClientError, ConnectionError) as err:
            raise Retryable(f"connection error ({type(err).__name__})") from None
        if status in _RETRY_STATUS or (status >= 500 and status != 501):
            raise Retryable(f"HTTP {status}", retry_after)
        if status == 400 and "logprobs" in text.lower() and "logprobs" in params:
            self._refuse_logprobs()
            return await self.complete(req)
        if status >= 400:
            raise self._fatal(status, text)
        return self._answer(self._body(text, content_type), req)

    def _refuse_logprobs(self) -> None:
        if not self.logprobs_refused:
            log.warning("the teacher server refuses logprobs%s; distilling the text alone (no token-level "
                        "distillation from this teacher)", " in thinking mode" if self.tc.thinking else "")
        self.logprobs_refused = True

    def _body(self, text: str, content_type: str) -> dict:
        """A chat-completions body; a 2xx that is not one (a web page, another API's JSON) means a
        wrong base_url, while a JSON body torn in transit, or a proxy's page sent as JSON, is retried."""
        try:
            body = parse_body(text)
        except Retryable:
            if "json" in content_type or text.lstrip()[:1] in ("{", "["):
                raise
            raise self._not_chat(f"a {content_type or 'non-JSON'} page") from None
        if "choices" not in body and "error" not in body:
            raise self._not_chat(f"JSON without choices (keys: {', '.join(list(body)[:5])})")
        return body

    def _not_chat(self, what: str) -> TeacherError:
        hint = _WRONG_API.format(url=self.tc.base_url)
        return TeacherError(f"teacher answered {what} instead of a chat completion: {hint}")

    def _answer(self, body: dict, req: Request) -> Answer:
        try:
            choice = body["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise Retryable("response has no choices[0].message") from None
        content = message.get("content") or ""
        # DeepSeek and vLLM's older parsers say reasoning_content; vLLM's newer ones and others, reasoning.
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        reasoning = reasoning if isinstance(reasoning, str) else ""
        finish = choice.get("finish_reason") or "stop"
        if not content.strip() and finish != "length" and "response_format" in req.params:
            raise Retryable("blank content in JSON mode")
        # An empty list is a real answer for an empty completion; only a missing list means "none".
        packed = None
        lp = choice.get("logprobs")
        entries = lp.get("content") if isinstance(lp, dict) else None
        if isinstance(entries, list) and req.params.get("top_logprobs"):
            try:
                packed = pack_logprobs(entries, int(req.params["top_logprobs"]))
            except (TypeError, ValueError, AttributeError):  # malformed logprobs: keep the answer, drop them
                packed = None
        usage = {k: v for k, v in (body.get("usage") or {}).items() if isinstance(v, (int, float))}
        details = (body.get("usage") or {}).get("completion_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int):
            usage["reasoning_tokens"] = details["reasoning_tokens"]
        flags = answer_flags(content, finish, message.get("refusal"), reasoning if self.tc.thinking else None)
        answer = Answer(content, finish, usage, packed, flags, reasoning)
        if not content.strip() and finish != "length":  # blank: usually a server hiccup, so ask again
            raise Retryable("blank content", answer=answer)
        return answer


# ---- in-process Hugging Face teacher ------------------------------------------------------------

class LocalClient:
    """A local transformers model as teacher. Concurrent calls are gathered into batches."""

    def __init__(self, tc: TeacherConfig):
        self.tc = tc
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def __aenter__(self) -> "LocalClient":
        from shifu.device import placement
        from shifu.models import load_causal_lm, load_tokenizer

        self.tok = load_tokenizer(self.tc.model, self.tc.trust_remote_code, padding_side="left")
        # shifu.device's rule: bf16 (or fp16) on this process's GPU, fp32 on CPU
        where = placement("auto")
        device_map = where.device_map if where.device.type == "cuda" else None
        self.model = load_causal_lm(self.tc.model, self.tc.trust_remote_code, where.dtype, device_map=device_map).eval()
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc) -> None:
        self.worker.cancel()

    async def complete(self, req: Request) -> Answer:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((req, fut))
        return await fut

    async def _serve(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.tc.local_batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                answers = await asyncio.to_thread(self._generate, [r for r, _ in batch])
                for (_, fut), ans in zip(batch, answers):
                    fut.set_result(ans)
            except Exception as err:  # one failed batch must not hang the callers
                for _, fut in batch:
                    fut.set_exception(Retryable(f"local generation failed: {err}"))

    def _generate(self, reqs: list[Request]) -> list[Answer]:
        import torch

        from shifu.models import end_token_ids, token_bytes_table

        texts = [self.tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) for r in reqs]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        p = reqs[0].params
        sample = p.get("temperature", 0) > 0
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=p["max_tokens"], do_sample=sample,
                                      temperature=p.get("temperature") if sample else None,
                                      top_p=p.get("top_p"), output_scores=True, return_dict_in_generate=True,
                                      eos_token_id=end_token_ids(self.tok), pad_token_id=self.tok.pad_token_id)
        k = int(p.get("top_logprobs") or 0)
        table = token_bytes_table(self.tok) if k else None
        scores = torch.stack(out.scores, 1).float().log_softmax(-1) if k else None
        ends = set(end_token_ids(self.tok))
        answers = []
        for i in range(len(reqs)):
            gen = out.sequences[i, enc["input_ids"].shape[1]:].tolist()
            stop = next((j for j, t in enumerate(gen) if t in ends), None)
            ids = gen[:stop] if stop is not None else gen
            content = self.tok.decode(ids, skip_special_tokens=True)
            finish = "stop" if stop is not None else "length"
            packed = None
            if k:
                entries = []
                for j, t in enumerate(ids):
                    top = scores[i, j].topk(k)
                    entries.append({"bytes": list(table[t]), "logprob": scores[i, j, t].item(),
                                    "top_logprobs": [{"bytes": list(table[c]), "logprob": v}
                                                     for v, c in zip(top.values.tolist(), top.indices.tolist())]})
                packed = pack_logprobs(entries, k)
            usage = {"prompt_tokens": int(enc["attention_mask"][i].sum()), "completion_tokens": len(ids)}
            answers.append(Answer(content, finish, usage, packed, answer_flags(content, finish)))
        return answers


def make_client(tc: TeacherConfig) -> OpenAIClient | LocalClient:
    return OpenAIClient(tc) if tc.kind == "openai" else LocalClient(tc)
