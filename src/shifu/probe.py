"""The teacher's lines of `shifu check`: API key, server reachable, model served, logprobs and thinking returned."""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request

# shifu.check imports this module only inside run_check, so importing it here makes no cycle
from shifu.check import Result, check_model, fail, ok
from shifu.config import Config
from shifu.errors import UserError

_PROBE_TIMEOUT_S = 30.0


def _teacher_used(cfg: Config) -> bool:
    return cfg.teacher_data_ratio > 0


def _key(cfg: Config) -> str:
    return os.environ.get(cfg.teacher.api_key_env, "").strip()


def check_key(cfg: Config) -> list[Result]:
    from shifu.teacher import is_local

    tc = cfg.teacher
    if tc.kind == "local" or not _teacher_used(cfg):
        return []
    if _key(cfg):
        return [ok("API key", f"{tc.api_key_env} is set")]
    if is_local(tc.base_url):
        return [ok("API key", f"{tc.api_key_env} is not set; a server on this machine needs none")]
    return [fail("API key", f"environment variable {tc.api_key_env} is not set",
                 f"export {tc.api_key_env}=<your key> (never in a file), or set teacher.api_key_env "
                 "to the variable that holds it")]


class _Unreachable(Exception):
    pass


def _list_models(cfg: Config) -> list[str] | None:
    """The ids GET {base_url}/models lists; None where the server has no such endpoint."""
    import json

    tc = cfg.teacher
    req = urllib.request.Request(tc.base_url.rstrip("/") + "/models")
    if _key(cfg):
        req.add_header("Authorization", f"Bearer {_key(cfg)}")
    try:
        with urllib.request.urlopen(req, timeout=min(tc.timeout_s, 10.0)) as resp:
            body = json.loads(resp.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise UserError(f"the teacher rejected the key in {tc.api_key_env} (HTTP 401 on /models)") from None
        return None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _Unreachable(f"cannot connect to {tc.base_url} ({reason})") from None
    except ValueError:  # not JSON: not an OpenAI-style model list
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [str(m.get("id")) for m in data if isinstance(m, dict)]


_THINKING_PROBE_TOKENS = 256


async def _probe(cfg: Config):
    """One request of one token (a few hundred for a thinking teacher), with logprobs when the config
    asks for them; also whether the server refused logprobs (then the client asks without them)."""
    from shifu.teacher import OpenAIClient, Request

    tc = cfg.teacher.model_copy(update={"timeout_s": min(cfg.teacher.timeout_s, _PROBE_TIMEOUT_S),
                                        "max_concurrency": 1})
    req = Request.build(tc, "Reply with one word: ok")
    # a thinking teacher spends its first tokens reasoning: room for a short thought and the word
    req.params["max_tokens"] = _THINKING_PROBE_TOKENS if tc.thinking else 1
    async with OpenAIClient(tc) as client:
        ans = await client.complete(req)
        return ans, client.logprobs_refused


def _wants_logprobs(cfg: Config) -> bool:
    from shifu.targets import resolve_source

    return cfg.teacher.top_logprobs > 0 and resolve_source(cfg, scoring=True) == "api"


def _probe_results(cfg: Config) -> list[Result]:
    from shifu.errors import TeacherError
    from shifu.limits import price_of
    from shifu.logprobs import unpack_logprobs
    from shifu.teacher import Retryable

    tc = cfg.teacher
    try:
        ans, refused = asyncio.run(_probe(cfg))
    except TeacherError as err:
        return [fail("teacher", str(err))]
    except Retryable as err:
        if err.unreachable:
            return [fail("teacher", f"cannot connect to {tc.base_url}", "start the server, or fix teacher.base_url")]
        if err.reason == "HTTP 429":
            return [Result("teacher", "warn", "rate-limited right now (HTTP 429); the run retries with backoff")]
        return [fail("teacher", f"{tc.base_url}/chat/completions answered with {err.reason}: not an "
                     "OpenAI-compatible chat server", "fix teacher.base_url (vLLM and llama.cpp serve under "
                     "/v1, e.g. http://127.0.0.1:8000/v1)")]
    cost = price_of(ans.usage, tc.prices.get(tc.model), tc.peak_pricing)
    shown = "no price in teacher.prices" if cost is None else f"cost {cost:.6f}"
    results = [ok("teacher", f"{tc.model} answered at {tc.base_url} (one request, "
                  f"{ans.usage.get('prompt_tokens', '?')} + {ans.usage.get('completion_tokens', '?')} tokens, {shown})")]
    if tc.thinking:
        results.append(_thinking_result(ans))
    if not _wants_logprobs(cfg):
        return results
    if refused:
        return results + [Result("logprobs", "warn", "the teacher refuses logprobs in thinking mode: the run "
                                 "distils its text alone (no token-level distillation)")]
    if ans.logprobs is None and tc.thinking and not ans.content:
        return results + [Result("logprobs", "warn", "the probe's thought took all its tokens, so no answer "
                                 "token came back to show logprobs; they are checked in the run")]
    if ans.logprobs is None:
        return results + [fail("logprobs", f"the teacher returned no logprobs although teacher.top_logprobs="
                               f"{tc.top_logprobs}", "use a server that returns them (DeepSeek, vLLM, llama.cpp), "
                               "or set teacher.top_logprobs: 0 for sequence-level distillation")]
    _, _, alts, _ = unpack_logprobs(ans.logprobs)
    got = max((sum(1 for a in row if a) for row in alts), default=0)
    if got < tc.top_logprobs:
        return results + [Result("logprobs", "warn", f"the teacher returned {got} alternatives per token of the "
                                 f"{tc.top_logprobs} asked for (teacher.top_logprobs)")]
    return results + [ok("logprobs", f"top-{tc.top_logprobs} logprobs returned")]


def _thinking_result(ans) -> Result:
    if ans.reasoning.strip():
        return ok("thinking", f"thinking mode accepted ({len(ans.reasoning)} characters of reasoning returned)")
    return fail("thinking", "teacher.thinking is true but the teacher returned no reasoning "
                "(neither reasoning_content nor reasoning)", "use a thinking model or server (DeepSeek; vLLM with "
                "a reasoning parser), or set teacher.thinking: false")


def check_distill(cfg: Config) -> list[Result]:
    if cfg.distill.source == "api" and cfg.teacher.top_logprobs == 0:
        return [fail("logprobs", "distill.source is api but teacher.top_logprobs is 0: no distribution to learn",
                     "set teacher.top_logprobs (1 to 20), or distill.source: auto")]
    return []


def check_teacher(cfg: Config) -> list[Result]:
    from shifu.teacher import is_local

    tc = cfg.teacher
    if not _teacher_used(cfg):
        return [Result("teacher", "skip", "teacher_data_ratio is 0: no task goes to the teacher")]
    if tc.kind == "local":
        return check_model(tc.model, "teacher.model", tc.trust_remote_code, "teacher (local)")[0]
    if not _key(cfg) and not is_local(tc.base_url):
        return [Result("teacher", "skip", "not contacted: no API key")]
    try:
        served = _list_models(cfg)
    except _Unreachable as err:
        return [fail("teacher", str(err), "start the server, or fix teacher.base_url")]
    except UserError as err:
        return [fail("teacher", str(err), f"check the key in {tc.api_key_env}")]
    if served is not None and tc.model in served and not _wants_logprobs(cfg):
        return [ok("teacher", f"{tc.base_url} serves {tc.model} (GET /models; nothing spent)")]
    results = _probe_results(cfg)
    if served is None or tc.model in served:
        return results
    # Not listed: some servers (llama.cpp's own) answer to any name, so the request decides.
    listed = ", ".join(served[:8]) + (", ..." if len(served) > 8 else "")
    if results[0].status == "ok":
        return [Result("teacher", "warn", f"teacher.model {tc.model!r} is not in {tc.base_url}/models "
                       f"({listed}), but the server answered to it")] + results
    results[0].detail += f"; GET /models lists: {listed}"
    results[0].fix = results[0].fix or "set teacher.model to one of those"
    return results
