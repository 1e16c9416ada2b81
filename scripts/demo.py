"""The offline demo: a real teacher behind a real OpenAI-compatible server, a real student, one command.

    make demo                 # installs, fetches and verifies the models, then runs this
    python scripts/demo.py    # once the models are in $SHIFU_CACHE

Starts llama-cpp-python's server with Qwen2.5-Coder-1.5B-Instruct on 127.0.0.1, runs
`shifu run configs/demo.yaml` against it (student: Qwen2.5-Coder-0.5B-Instruct), and stops the
server whatever happens. Outputs land in runs/demo/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shifu.errors import UserError
from shifu.serve import llama_cpp_server

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))
STUDENT = CACHE / "hf" / "qwen0.5b"


def warm_up(base_url: str) -> None:
    """One token, before the run: the first request pages the 1.1 GB model in (37 s on a busy 2-core
    machine), longer than the preflight check's 30 s probe waits."""
    body = {"model": "qwen2.5-coder-1.5b-instruct", "max_tokens": 1, "messages": [{"role": "user", "content": "ok"}]}
    req = urllib.request.Request(base_url + "/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600):
        pass


def server_threads() -> tuple[str, ...]:
    """One llama.cpp thread on a machine already busier than its cores: its threads wait for each other
    at every operation, so one that is off its core stalls the rest (docs/BENCHMARKS.md: 29 CPU s and
    73 s a request with 1 thread, 51 CPU s and 105 s with 2, at load 8 on 2 cores)."""
    if os.getloadavg()[0] >= (os.cpu_count() or 1):
        return ("--n_threads", "1", "--n_threads_batch", "1")
    return ()


def main() -> int:
    if not (STUDENT / "config.json").exists():
        print(f"error: student folder {STUDENT} is missing; run `make demo-models` first", file=sys.stderr)
        return 2
    t0 = time.time()
    print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(the timings below are this machine's, shared or not)", flush=True)
    threads = server_threads()
    try:
        with llama_cpp_server(CACHE / "gguf" / "qwen1.5b.gguf", "qwen2.5-coder-1.5b-instruct",
                              ROOT / "runs" / "demo" / "teacher-server.log", extra_args=threads) as base_url:
            warm_up(base_url)
            print(f"teacher server ready on {base_url} ({time.time() - t0:.0f}s; "
                  f"{'1 thread: the machine is busier than its cores' if threads else 'a thread per core'})", flush=True)
            run = [sys.executable, "-m", "shifu", "run", "configs/demo.yaml",
                   "--set", f"teacher.base_url={base_url}", "--set", f"model_name={STUDENT}"]
            code = subprocess.call(run, cwd=ROOT)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if code == 0:
        print(f"\ndemo done in {time.time() - t0:.0f}s (load average {os.getloadavg()[0]:.1f} at the end). "
              "See runs/demo/: data/distill.jsonl, adapter/ (loss_curve.png), adapter_merged/, "
              "work/eval/report.html, work/eval/samples.md, work/summary.json")
        print("talk to the student:  .venv/bin/shifu chat configs/demo.yaml\n"
              "export it (GGUF + Ollama Modelfile):  .venv/bin/shifu export configs/demo.yaml --gguf --quant q4_k_m")
    return code


if __name__ == "__main__":
    sys.exit(main())
