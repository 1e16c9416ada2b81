"""Slow checks with real models and a real llama.cpp server (`make test-slow`; skipped by default).

They need the demo models in $SHIFU_CACHE (`make demo-models`) and llama-cpp-python[server]."""

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))
STUDENT, TEACHER_GGUF = CACHE / "hf" / "qwen0.5b", CACHE / "gguf" / "qwen1.5b.gguf"


def need(*paths):
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        pytest.skip(f"missing {missing}; run `make demo-models`")
    pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    need(TEACHER_GGUF, STUDENT)
    from shifu.serve import llama_cpp_server

    with llama_cpp_server(TEACHER_GGUF, "teacher", tmp_path_factory.mktemp("srv") / "log", port=8791) as url:
        yield url


def test_llama_cpp_logprobs_align_exactly_with_the_qwen_student(llama_server, tmp_path):
    """Teacher and student share Qwen's tokenizer: every answer token gets the teacher's exact ids."""
    import asyncio

    from shifu.align import align, student_vocab
    from shifu.config import TeacherConfig
    from shifu.logprobs import unpack_logprobs
    from shifu.models import load_tokenizer, token_bytes_table
    from shifu.teacher import OpenAIClient, Request

    tc = TeacherConfig(base_url=llama_server, model="teacher", extra_body={}, top_logprobs=5, max_tokens=48,
                       temperature=0)

    async def ask():
        async with OpenAIClient(tc) as client:
            return await client.complete(Request.build(tc, "用一句话介绍鲁迅。"))

    ans = asyncio.run(ask())
    assert ans.logprobs is not None and ans.content
    tokens, lp, cand, cand_lp = unpack_logprobs(ans.logprobs)
    assert b"".join(tokens).decode("utf-8").strip() == ans.content.strip()
    tok = load_tokenizer(str(STUDENT))
    table = token_bytes_table(tok)
    text = ans.content.strip()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows, _ = align(text.encode(), [table[i] for i in ids], ids, tokens, lp, cand, cand_lp,
                    student_vocab(table, set(tok.all_special_ids)), 6)
    covered = (rows >= 0).any(1).mean()
    assert covered > 0.95, covered
    assert np.mean(rows[:, 0] == np.asarray(ids)) > 0.8  # greedy: the chosen token is mostly the top one


def test_real_student_trains_a_few_steps_on_real_teacher_answers(llama_server, tmp_path, make_config):
    from conftest import SAMPLE_ZH

    from shifu.pipeline import run_all

    raw = tmp_path / "one_chunk.txt"
    raw.write_text(SAMPLE_ZH.read_text(encoding="utf-8")[:450], encoding="utf-8")
    cfg = make_config(llama_server, raw=raw, model_name=str(STUDENT), chunk_size=500, max_length=256, batch_size=2,
                      teacher__model="teacher", teacher__extra_body={}, teacher__top_logprobs=5,
                      teacher__max_tokens=48, teacher__max_concurrency=2, teacher__timeout_s=300,
                      tasks__qa_per_chunk=1, enable_article=False, train__max_steps=2, eval__eval_ratio=0.0,
                      teacher__temperature=0)  # sampled, the 1.5B teacher sometimes answers in one word
    res = run_all(cfg, until="train")
    assert res["train"]["kd_source"] == "api" and res["train"]["kd_coverage"] > 0.9
