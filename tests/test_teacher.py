"""The teacher client on its own: request keys, logprob packing, answer checks, prices, and how
each fault of the fake server is classified by one `OpenAIClient.complete` call.

    .venv/bin/pytest tests/test_teacher.py -q
"""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from email.utils import formatdate

import numpy as np
import pytest

from shifu.config import Price, TeacherConfig
from shifu.errors import TeacherError, UserError
from shifu.fake_openai import FAULTS, FakeBackend
from shifu.limits import price_of
from shifu.logprobs import pack_logprobs, unpack_logprobs
from shifu.teacher import (
    OpenAIClient,
    Request,
    Retryable,
    _retry_after,
    answer_flags,
    parse_body,
)

PROMPT = "请根据下面的文本回答问题。\n\n天是蓝色的，因为空气散射阳光中的蓝光。"
RETRYABLE = {"429", "500", "502", "503", "504", "timeout", "reset", "truncated", "invalid", "blank_json", "empty"}
FLAGGED = {"length": "truncated", "refusal": "refusal"}


def complete(tc: TeacherConfig, req: Request):
    async def go():
        async with OpenAIClient(tc) as client:
            return await client.complete(req)

    return asyncio.run(go())


def teacher(url: str, **kw) -> TeacherConfig:
    return TeacherConfig(base_url=url, model="fake-teacher", **{"timeout_s": 5, **kw})


# ---- request keys -------------------------------------------------------------------------------

def test_request_key_covers_everything_that_changes_the_answer():
    tc = TeacherConfig(base_url="https://api.deepseek.com", model="m")
    key = Request.build(tc, PROMPT).key
    assert Request.build(tc, PROMPT).key == key
    assert Request.build(tc.model_copy(update={"base_url": "https://api.deepseek.com/"}), PROMPT).key == key
    others = [Request.build(tc, PROMPT + "?").key, Request.build(tc, PROMPT, json_mode=True).key]
    for field, value in [("base_url", "http://127.0.0.1:8000/v1"), ("model", "m2"), ("temperature", 0.1),
                         ("max_tokens", 7), ("top_p", 0.9), ("top_logprobs", 5), ("extra_body", {})]:
        others.append(Request.build(tc.model_copy(update={field: value}), PROMPT).key)
    assert len({key, *others}) == len(others) + 1


# ---- logprobs -----------------------------------------------------------------------------------

def _entries(n: int, k: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for i in range(n):
        tok = bytes([0xE5, 0xA4]) if i % 3 == 0 else f"t{i}".encode()  # half a UTF-8 character, as BPE makes
        alts = [{"token": f"a{j}", "bytes": list(f"a{i}-{j}".encode()), "logprob": float(-j - rng.random())}
                for j in range(k if i % 2 else k - 1)]  # some positions have fewer alternatives than k
        out.append({"token": tok.decode("utf-8", "replace"), "bytes": list(tok), "logprob": -0.25,
                    "top_logprobs": alts})
    return out


def test_logprobs_round_trip_through_pack_and_unpack():
    rng = np.random.default_rng(0)
    k = 5
    entries = _entries(200, k, rng)
    chosen, chosen_lp, cands, cand_lp = unpack_logprobs(pack_logprobs(entries, k))
    assert chosen == [bytes(e["bytes"]) for e in entries]
    assert np.allclose(chosen_lp, -0.25)
    assert cand_lp.shape == (200, k) and cand_lp.dtype == np.float32
    for i, e in enumerate(entries):
        alts = e["top_logprobs"]
        assert cands[i][:len(alts)] == [bytes(a["bytes"]) for a in alts]
        assert np.allclose(cand_lp[i, :len(alts)], [a["logprob"] for a in alts])
        assert np.all(np.isneginf(cand_lp[i, len(alts):]))  # missing alternatives are -inf, never made up


def test_logprobs_without_bytes_field_use_the_token_text():
    entries = [{"token": "天", "logprob": -0.5, "top_logprobs": [{"token": "地", "logprob": -1.0}]}]
    chosen, _, cands, cand_lp = unpack_logprobs(pack_logprobs(entries, 1))
    assert chosen == ["天".encode()] and cands == [["地".encode()]] and cand_lp[0, 0] == -1.0


def test_packed_logprobs_are_far_smaller_than_the_json_they_came_from():
    entries = FakeBackend().logprobs({"messages": [{"content": PROMPT}], "top_logprobs": 20}, PROMPT * 10)["content"]
    packed = pack_logprobs(entries, 20)
    as_json = json.dumps(entries, ensure_ascii=False).encode()
    assert len(packed) * 4 < len(as_json), (len(packed), len(as_json))
    assert len(unpack_logprobs(packed)[0]) == len(entries)


def test_empty_answer_packs_to_an_empty_blob_and_foreign_blobs_are_rejected():
    chosen, chosen_lp, cands, cand_lp = unpack_logprobs(pack_logprobs([], 3))
    assert chosen == [] and chosen_lp.shape == (0,) and cand_lp.shape == (0, 3)
    import zlib

    with pytest.raises(ValueError, match="not a shifu logprobs blob"):
        unpack_logprobs(zlib.compress(b"JUNK" + bytes(8)))


# ---- bodies, flags, prices, Retry-After ---------------------------------------------------------

def test_parse_body_reads_through_keepalive_lines_and_rejects_garbage():
    assert parse_body('\n\n: keep-alive\n\n: keep-alive\n{"choices": []}') == {"choices": []}
    for bad in ['{"choices": [', "<html>502 Bad Gateway</html>", "[1, 2]", ""]:
        with pytest.raises(Retryable):
            parse_body(bad)


def test_answer_flags():
    assert answer_flags("一个完整的回答。", "stop") == []
    assert answer_flags("回答到一半", "length") == ["truncated"]
    assert answer_flags("  \n", "stop") == ["empty"]
    assert answer_flags("", "length") == ["truncated", "empty"]
    assert answer_flags("抱歉，我无法回答这个问题。", "stop") == ["refusal"]
    assert answer_flags("I'm sorry, but I can't help with that.", "stop") == ["refusal"]
    assert answer_flags("Anything", "stop", refusal="policy") == ["refusal"]
    assert answer_flags("抱歉，刚才说错了，地球绕太阳转。", "stop") == []  # an apology is not a refusal


def test_price_of_counts_cache_hits_misses_output_and_peak_hours():
    price = Price(input_cache_hit=0.1, input_cache_miss=1.0, output=2.0, peak_output=4.0)
    usage = {"prompt_tokens": 1000, "prompt_cache_hit_tokens": 400, "prompt_cache_miss_tokens": 600,
             "completion_tokens": 500}
    off_peak = calendar.timegm((2026, 1, 5, 12, 0, 0))  # 12:00 UTC
    peak = off_peak - 10 * 3600  # 02:00 UTC
    assert price_of(usage, price, True, when=off_peak) == pytest.approx((400 * 0.1 + 600 * 1.0 + 500 * 2.0) / 1e6)
    assert price_of(usage, price, True, when=peak) == pytest.approx((400 * 0.1 + 600 * 1.0 + 500 * 4.0) / 1e6)
    assert price_of(usage, price, False, when=peak) == price_of(usage, price, True, when=off_peak)
    saturday = calendar.timegm((2026, 1, 10, 2, 0, 0))  # DeepSeek has no peak hours at weekends
    assert price_of(usage, price, True, when=saturday) == price_of(usage, price, True, when=off_peak)
    # A server without cache fields: every prompt token is a miss.
    assert price_of({"prompt_tokens": 1000, "completion_tokens": 0}, price, False) == pytest.approx(1000 / 1e6)
    assert price_of(usage, None, True) is None


def test_retry_after_reads_seconds_and_http_dates():
    assert _retry_after("3") == 3.0
    assert _retry_after("0.5") == 0.5
    assert 8 <= _retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert _retry_after(formatdate(time.time() - 10, usegmt=True)) == 0.0
    assert _retry_after(None) is None and _retry_after("soon") is None


# ---- one call against the fake server, per fault ------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_classified(fake_server, fault):
    server = fake_server(fault_first=1, faults=[fault], timeout_sleep=3, retry_after="2")
    tc = teacher(server.url, timeout_s=0.5, top_logprobs=2)
    req = Request.build(tc, PROMPT, json_mode=True) if fault == "blank_json" else Request.build(tc, PROMPT)
    t0 = time.monotonic()
    if fault in RETRYABLE:
        with pytest.raises(Retryable) as info:
            complete(tc, req)
        assert time.monotonic() - t0 < 2.5  # a timeout ends at timeout_s, not when the server gives up
        if fault == "429":
            assert info.value.retry_after == 2.0
        assert not info.value.unreachable
        answer = complete(tc, req)  # the fault was the first request's only: the retry is answered
    else:
        answer = complete(tc, req)
    assert server.faults_sent[fault] == 1
    if fault in FLAGGED:
        assert answer.flags == [FLAGGED[fault]]
    else:
        assert answer.flags == [] and answer.content and answer.finish_reason == "stop"
        assert answer.usage["prompt_tokens"] > 0 and answer.usage["prompt_cache_hit_tokens"] > 0
        chosen = unpack_logprobs(answer.logprobs)[0]
        assert b"".join(chosen).decode() == answer.content  # the fake server's tokens are characters


@pytest.mark.parametrize("status,hint", [(400, "malformed"), (401, "MY_KEY_VAR"), (402, "top up"),
                                         (403, "forbidden"), (404, "teacher.model"), (422, "invalid parameters")])
def test_fatal_statuses_raise_one_line_that_says_what_to_do(fake_server, monkeypatch, status, hint):
    monkeypatch.setenv("MY_KEY_VAR", "sk-test-fatal")
    server = fake_server(fatal_status=status)
    tc = teacher(server.url, api_key_env="MY_KEY_VAR")
    with pytest.raises(TeacherError) as info:
        complete(tc, Request.build(tc, PROMPT))
    message = str(info.value)
    assert hint in message and f"HTTP {status}" in message and "\n" not in message


@pytest.mark.parametrize("wrong", [404, 405, 501, "html", "json"])
def test_a_server_that_is_not_openai_compatible_is_a_wrong_base_url_at_once(fake_server, wrong):
    server = fake_server(wrong_api=wrong)
    tc = teacher(server.url)
    with pytest.raises(TeacherError) as info:
        complete(tc, Request.build(tc, PROMPT))
    message = str(info.value)
    assert "teacher.base_url" in message and server.url in message and "\n" not in message
    assert server.received == 1


def test_a_blank_plain_answer_is_retried_and_carries_the_answer_to_record_at_the_end(fake_server):
    server = fake_server(fault_first=1, faults=["empty"])
    tc = teacher(server.url)
    req = Request.build(tc, PROMPT)
    with pytest.raises(Retryable) as info:
        complete(tc, req)
    assert info.value.reason == "blank content" and info.value.answer.flags == ["empty"]
    assert complete(tc, req).content  # asked again, answered


def test_a_key_the_server_echoes_back_never_reaches_the_error(fake_server, monkeypatch):
    key = "sk-test-echo-0123456789abcdef"
    monkeypatch.setenv("DEEPSEEK_API_KEY", key)
    server = fake_server(fatal_status=401, echo_key=True)
    tc = teacher(server.url)
    with pytest.raises(TeacherError) as info:
        complete(tc, Request.build(tc, PROMPT))
    assert server.auth_headers == [f"Bearer {key}"]  # it was sent, so the test can fail
    assert key not in str(info.value) and "<redacted>" in str(info.value)


def test_missing_api_key_is_one_clear_line_unless_the_server_is_local(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(UserError, match="NO_SUCH_KEY_VAR is not set"):
        OpenAIClient(TeacherConfig(base_url="https://api.deepseek.com", api_key_env="NO_SUCH_KEY_VAR"))
    OpenAIClient(TeacherConfig(base_url="http://127.0.0.1:8011/v1", api_key_env="NO_SUCH_KEY_VAR"))


def test_connection_refused_is_retryable_and_marked_unreachable(free_port):
    tc = teacher(f"http://127.0.0.1:{free_port}/v1")
    with pytest.raises(Retryable) as info:
        complete(tc, Request.build(tc, PROMPT))
    assert info.value.unreachable and "cannot connect" in info.value.reason


@pytest.fixture()
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
