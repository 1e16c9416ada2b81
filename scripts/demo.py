"""The offline demo: a real teacher behind a real OpenAI-compatible server, a real student, one command.

    make demo                 # installs, fetches and verifies the models, then runs this
    python scripts/demo.py    # once the models are in $SHIFU_CACHE

Starts llama-cpp-python's server with Qwen2.5-Coder-1.5B-Instruct on 127.0.0.1, runs
`shifu run configs/demo.yaml` against it (student: Qwen2.5-Coder-0.5B-Instruct), and stops the
server whatever happens. Outputs land in runs/demo/.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))
TEACHER_GGUF = CACHE / "gguf" / "qwen1.5b.gguf"
STUDENT = CACHE / "hf" / "qwen0.5b"
ALIAS = "qwen2.5-coder-1.5b-instruct"


def free_port(preferred: int = 8765) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise SystemExit("error: no free port on 127.0.0.1")


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the llama.cpp server exited with code {proc.returncode}; see runs/demo/teacher-server.log")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit("error: the llama.cpp server did not come up in time; see runs/demo/teacher-server.log")


def main() -> int:
    for path, what in ((TEACHER_GGUF, "teacher GGUF"), (STUDENT / "config.json", "student folder")):
        if not path.exists():
            raise SystemExit(f"error: {what} {path} is missing; run `make demo-models` first")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    log_path = ROOT / "runs" / "demo" / "teacher-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(TEACHER_GGUF), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "4096", "--n_threads", threads, "--model_alias", ALIAS,
           ]
    print(f"starting the teacher server: {ALIAS} on {base_url}", flush=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    # SIGTERM (CI timeouts, kill) must reach the finally below, so the server never outlives us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        wait_ready(base_url, server)
        run = [sys.executable, "-m", "shifu", "run", "configs/demo.yaml",
               "--set", f"teacher.base_url={base_url}", "--set", f"model_name={STUDENT}"]
        print("running:", " ".join(run[2:]), flush=True)
        code = subprocess.call(run, cwd=ROOT)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    if code == 0:
        print("\ndone. See runs/demo/: data/distill.jsonl, adapter/, adapter_merged/, work/eval/samples.md, "
              "work/summary.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
