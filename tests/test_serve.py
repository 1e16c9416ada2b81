"""shifu.serve: the llama.cpp server must not read the caller's environment as its settings."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import sys
import types

import pydantic
import pytest

import shifu.export
import shifu.serve
from shifu.errors import UserError
from shifu.serve import server_env


def test_server_env_drops_variables_the_server_reads_as_settings(monkeypatch):
    # Stand-ins for llama_cpp.server.settings: pydantic models whose fields the server fills from the environment.
    settings = types.ModuleType("llama_cpp.server.settings")
    settings.ModelSettings = pydantic.create_model("ModelSettings", cache=(bool, False), model=(str, ""))
    settings.ServerSettings = pydantic.create_model("ServerSettings", port=(int, 8000))
    for name in ("llama_cpp", "llama_cpp.server"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "llama_cpp.server.settings", settings)
    monkeypatch.setenv("CACHE", "/tmp/shifu-cache")  # `make demo CACHE=...` once crashed the server this way
    monkeypatch.setenv("Model", "other.gguf")
    monkeypatch.setenv("SHIFU_CACHE", "/tmp/shifu-cache")
    env = server_env()
    assert "CACHE" not in env and "Model" not in env and "PORT" not in env
    assert env["SHIFU_CACHE"] == "/tmp/shifu-cache" and env["PATH"]


# ---- shifu serve: the student behind the teacher's API ------------------------------------------------



def test_serve_exports_a_missing_gguf_then_serves_it_on_loopback(make_config, monkeypatch):
    cfg = make_config()
    seen = {}

    def fake_export(cfg_, quant, check=True, pre_tokenizer=None):
        path = shifu.export.gguf_path(cfg_, quant)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF")
        seen["export"] = (quant, check)

    @contextlib.contextmanager
    def fake_server(gguf, alias, log_path, port, host):
        seen["server"] = (gguf, alias, port, host)
        yield f"http://127.0.0.1:{port}/v1"

    def stop(url, name, log_path):
        raise KeyboardInterrupt  # Ctrl-C: the server stops and serve returns quietly

    monkeypatch.setattr(shifu.export, "run_export", fake_export)
    monkeypatch.setattr(shifu.serve, "llama_cpp_server", fake_server)
    monkeypatch.setattr(shifu.serve, "_until_interrupted", stop)
    monkeypatch.setattr(shifu.serve, "vllm_usable", lambda: False)
    shifu.serve.run_serve(cfg, "q4_k_m", port=8123)
    assert seen["export"] == ("q4_k_m", False)
    assert seen["server"] == (shifu.export.gguf_path(cfg, "q4_k_m"), "adapter", 8123, "127.0.0.1")


def test_serve_engine_choice(make_config, monkeypatch):
    cfg = make_config()
    with pytest.raises(UserError, match="--engine 'tgi'"):
        shifu.serve.run_serve(cfg, engine="tgi")
    monkeypatch.setattr(shifu.serve, "vllm_usable", lambda: True)
    with pytest.raises(UserError, match="run `shifu merge` first"):  # vLLM serves the merged folder
        shifu.serve.run_serve(cfg)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.skipif(not (shifu.export.converter_dir() / "convert_hf_to_gguf.py").exists(), reason="make export-tools")
def test_teacher_client_talks_to_the_served_student(make_config, tiny_student, tmp_path):
    from shifu.config import TeacherConfig
    from shifu.teacher import OpenAIClient, Request

    cfg = make_config()
    shutil.copytree(tiny_student, cfg.merged_dir)
    report = shifu.export.run_export(cfg, "q8_0", check=False, pre_tokenizer="gpt-2")
    with shifu.serve.llama_cpp_server(report["gguf"], "adapter", tmp_path / "serve.log", n_ctx=512, port=8766) as url:
        tc = TeacherConfig(base_url=url, model="adapter", extra_body={}, temperature=0, max_tokens=8,
                           top_logprobs=3, timeout_s=60)

        async def ask():
            async with OpenAIClient(tc) as client:
                return await client.complete(Request.build(tc, "孔乙己是谁？"))

        answer = asyncio.run(ask())
    assert answer.content.strip() and answer.finish_reason in ("stop", "length")
    assert answer.usage["completion_tokens"] <= 8 and answer.logprobs  # top-k logprobs, as from a teacher
