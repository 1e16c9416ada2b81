"""Serve a GGUF model over an OpenAI-compatible API on 127.0.0.1 with llama-cpp-python, for as long
as a `with` block runs (the offline demo and benchmarks use it as their teacher), and `shifu serve`:
the distilled student behind the same API the teacher had.

    shifu serve configs/demo.yaml      # the exported GGUF (made if missing) on http://127.0.0.1:8000/v1

    with llama_cpp_server(gguf_path, alias="qwen2.5-coder-1.5b-instruct") as base_url:
        ...   # base_url = "http://127.0.0.1:PORT/v1"

Needs `pip install 'llama-cpp-python[server]'` (compiled locally; `make demo` does it). The server
runs in its own process group and is terminated with it on exit, SIGTERM included.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from shifu.errors import UserError


def free_port(preferred: int = 8765) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise UserError("no free port on 127.0.0.1")


def server_env() -> dict[str, str]:
    """This environment minus the variables llama-cpp-python's server would read as its own settings
    (pydantic-settings, case-insensitive): a stray CACHE or MODEL would override the command line."""
    try:
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:  # the server will not start either; its log says why
        return dict(os.environ)
    names = {name.lower() for cls in (ModelSettings, ServerSettings) for name in cls.model_fields}
    return {k: v for k, v in os.environ.items() if k.lower() not in names}


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the llama.cpp server exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise UserError(f"the llama.cpp server did not answer within {seconds:.0f}s; see {log_path}")


_top_wanted: list[int | None] = [None]  # the logprobs count of the completion being computed


def _vocab_sorted(iterable, *, key=None, reverse=False):
    """llama_cpp.llama's `sorted`. Its only calls sort (logprob, token id) pairs, highest first, and
    read `[:logprobs]`: the first entries from a heap are the same answer as a full sort."""
    if key is None and reverse and _top_wanted[0] is not None:
        return heapq.nlargest(_top_wanted[0], iterable)
    return sorted(iterable, key=key, reverse=reverse)


def patch_llama_sort() -> None:
    """For the server process: llama-cpp-python sorts the whole vocabulary's (logprob, id) pairs
    (152k numpy scalars for Qwen) in Python for every answer token when logprobs are asked, to keep
    the first top_logprobs: 0.5 CPU s a token here, most of a logprobs request's CPU time
    (bench/teacher_server.py). The requested count is noted as each completion starts (the server
    computes one at a time); without it the full sort runs."""
    from llama_cpp import llama

    create = llama.Llama._create_completion

    def _create_completion(self, *args, **kwargs):
        _top_wanted[0] = kwargs["logprobs"] if "logprobs" in kwargs and not args else None
        yield from create(self, *args, **kwargs)

    llama.Llama._create_completion = _create_completion
    llama.sorted = _vocab_sorted


# the server's own command line, with patch_llama_sort applied first
_PATCHED_SERVER = ("import runpy, shifu.serve; shifu.serve.patch_llama_sort(); "
                   "runpy.run_module('llama_cpp.server', run_name='__main__')")


@contextlib.contextmanager
def llama_cpp_server(gguf: str | Path, alias: str, log_path: str | Path, n_ctx: int = 4096,
                     port: int = 8765, ready_s: float = 300, host: str = "127.0.0.1",
                     extra_args: tuple[str, ...] = (), fast_logprobs: bool = True) -> Iterator[str]:
    """extra_args go last on the server's command line, so they override the settings here
    (bench/teacher_server.py times n_threads with them); fast_logprobs: patch_llama_sort."""
    if not Path(gguf).exists():
        raise UserError(f"{gguf}: GGUF file not found; run `make demo-models` (scripts/fetch_models.py)")
    port = free_port(port)
    url = f"http://127.0.0.1:{port}/v1"  # where this machine reaches it, whatever address it binds
    launch = ["-c", _PATCHED_SERVER] if fast_logprobs else ["-m", "llama_cpp.server"]
    cmd = [sys.executable, *launch, "--model", str(gguf), "--host", host, "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(os.cpu_count() or 1), "--model_alias", alias, *extra_args]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_env())
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    try:
        _wait_ready(url, proc, log_path, ready_s)
        yield url
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def served_name(cfg) -> str:
    """The model name clients send: the adapter folder's name (`distilled-model` by default)."""
    return Path(cfg.output_dir).name


def vllm_usable() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _until_interrupted(url: str, name: str, log_path: Path | None) -> None:
    from shifu.progress import console

    where = f"; log: {log_path}" if log_path else ""
    console.print(f"serving [bold]{name}[/] on {url} (chat completions at {url}/chat/completions); "
                  f"Ctrl-C stops{where}", highlight=False)
    while True:
        time.sleep(3600)


def serve_vllm(cfg, host: str, port: int) -> None:
    """vLLM on the merged folder, in the foreground (it serves the folder's own chat template)."""
    if not (cfg.merged_dir / "config.json").exists():
        raise UserError(f"{cfg.merged_dir}: no merged model; run `shifu merge` first")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(cfg.merged_dir),
           "--served-model-name", served_name(cfg), "--host", host, "--port", str(port)]
    raise SystemExit(subprocess.call(cmd))


def run_serve(cfg, quant: str = "q8_0", host: str = "127.0.0.1", port: int = 8000, engine: str = "auto") -> None:
    if engine not in ("auto", "llama.cpp", "vllm"):
        raise UserError(f"--engine {engine!r}: choose auto, llama.cpp or vllm")
    if engine == "vllm" or (engine == "auto" and vllm_usable()):
        return serve_vllm(cfg, host, port)
    from shifu.export import gguf_path, run_export

    gguf = gguf_path(cfg, quant)
    if not gguf.exists():
        run_export(cfg, quant, check=False)
    log_path = gguf.parent / "serve.log"
    try:
        with llama_cpp_server(gguf, served_name(cfg), log_path, port=port, host=host) as url:
            _until_interrupted(url, served_name(cfg), log_path)
    except KeyboardInterrupt:  # the way to stop a server: not an error
        pass
