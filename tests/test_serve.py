"""shifu.serve: the llama.cpp server must not read the caller's environment as its settings."""

from __future__ import annotations

import sys
import types

import pydantic

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
