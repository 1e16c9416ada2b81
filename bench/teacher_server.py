"""Where the demo teacher's time goes: llama-cpp-python's server with Qwen2.5-Coder-1.5B (Q4_K_M) on
this machine's CPU cores, one request at a time (its server handles one at a time anyway), with the
demo's request shape: one chunk of data/sample_zh.txt in a question prompt, max_tokens 80.

    python bench/teacher_server.py              # writes its section of docs/BENCHMARKS.md
    python bench/teacher_server.py --n 2 --no-write

Each variant gets fresh chunks (llama-cpp-python reuses the longest cached prompt prefix, so a repeated
prompt would skip prompt evaluation). Per request: wall time seen by the client and the server process's
CPU time (llama.cpp's own perf print in the server log reads 0 ms for prompt eval in this version, so it
is not used). Variants that only change the request share one server, and all run back to back so
they see the same load; the machine is shared, so read CPU s for the work and wall s for the wait.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from common import ROOT, machine, write_section

from shifu.serve import llama_cpp_server

CACHE = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))
GGUF = CACHE / "gguf" / "qwen1.5b.gguf"
ALIAS = "qwen2.5-coder-1.5b-instruct"
VOCAB = 151936  # Qwen2.5's vocabulary: the width of every log-softmax llama-cpp-python computes
LP10 = {"logprobs": True, "top_logprobs": 10}

# (label, (server arguments, patch_llama_sort on), request parameters): one server per distinct server
ONE_THREAD = ("--n_threads", "1", "--n_threads_batch", "1")
PLAIN, FAST = ((), False), ((), True)
VARIANTS = [
    ("before: 2 threads, top_logprobs 10, max_tokens 80, llama-cpp-python as is", PLAIN, {**LP10, "max_tokens": 80}),
    ("2 threads, top_logprobs 10, max_tokens 80, sort patched (shifu.serve)", FAST, {**LP10, "max_tokens": 80}),
    ("2 threads, no logprobs, max_tokens 80", FAST, {"max_tokens": 80}),
    ("2 threads, prompt only (max_tokens 1, no logprobs)", FAST, {"max_tokens": 1}),
    ("1 thread, top_logprobs 10, max_tokens 80, sort patched", (ONE_THREAD, True), {**LP10, "max_tokens": 80}),
]


def chunks(n: int, size: int = 450) -> list[str]:
    text = (ROOT / "data" / "sample_zh.txt").read_text(encoding="utf-8").replace("\n", "")
    return [text[i * size:(i + 1) * size] for i in range(n)]


def ask(url: str, chunk: str, params: dict) -> tuple[float, dict]:
    body = {"model": ALIAS, "temperature": 0.3, **params, "messages": [
        {"role": "user", "content": f"阅读下面的文字，提出一个问题，并用一两句话回答。\n\n{chunk}"}]}
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return time.perf_counter() - t, out


def server_pid(port: str) -> int:
    """The llama.cpp server listening on port (its CPU time is read from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"llama_cpp.server" in arg for arg in cmd) and port.encode() in cmd:
            return int(proc.name)
    raise RuntimeError(f"no llama_cpp.server on port {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def run_variant(url: str, params: dict, texts: list[str]) -> dict:
    pid, rows = server_pid(url.rsplit(":", 1)[1].split("/")[0]), []
    for chunk in texts:
        cpu = cpu_seconds(pid)
        wall, usage = ask(url, chunk, params)
        usage = usage["usage"]
        rows.append((wall, usage["prompt_tokens"], usage["completion_tokens"], cpu_seconds(pid) - cpu))
    med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
    return {"n": len(rows), "wall": med(0), "prompt_tokens": med(1), "completion_tokens": med(2), "cpu": med(3),
            "load": os.getloadavg()[0]}


def python_logprobs_cost(prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
    """The work llama-cpp-python's non-streaming logprobs path does in Python, reproduced here: a
    log-softmax over every prompt and answer row of the vocabulary, then per answer token a Python
    sort of (logprob, id) pairs over the whole vocabulary. -> (log-softmax s, sorts s)."""
    from llama_cpp import Llama

    scores = np.random.default_rng(0).standard_normal((prompt_tokens + completion_tokens, VOCAB), np.float32)
    t = time.process_time()
    logprobs = Llama.logits_to_logprobs(scores)[prompt_tokens:]
    softmax_s = time.process_time() - t
    t = time.process_time()
    for row in logprobs[:4]:
        sorted(zip(row, range(len(row))), reverse=True)
    return softmax_s, (time.process_time() - t) / 4 * completion_tokens


def table(results: list[tuple[str, dict]]) -> str:
    lines = ["| variant | requests | wall s per request (median) | server CPU s per request | prompt tokens | "
             "answer tokens | answer tokens/s (wall) | load average after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results:
        lines.append(f"| {label} | {r['n']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['prompt_tokens']:.0f} | "
                     f"{r['completion_tokens']:.0f} | {r['completion_tokens'] / r['wall']:.1f} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3, help="requests per variant")
    ap.add_argument("--only", type=int, nargs="*", help="variant indices to run (default: all)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/BENCHMARKS.md")
    args = ap.parse_args()
    if not GGUF.exists():
        print(f"{GGUF} is missing: python scripts/fetch_models.py --gguf-only qwen1.5b", file=sys.stderr)
        return 2
    head = machine("llama_cpp_python", "numpy")
    t0, texts = time.time(), iter(chunks(args.n * len(VARIANTS)))
    chosen = [v for i, v in enumerate(VARIANTS) if args.only is None or i in args.only]
    results: list[tuple[str, dict]] = []
    same: dict[tuple, list] = {}  # server arguments -> logprobs of the warm-up answer, plain then patched
    for server_args in dict.fromkeys(v[1] for v in chosen):
        log = ROOT / "runs" / "bench" / "teacher-server.log"
        with llama_cpp_server(GGUF, ALIAS, log, extra_args=server_args[0], fast_logprobs=server_args[1]) as url:
            # not timed: the first request pays for loading pages; its top-10 logprobs (greedy, 8 tokens)
            # are compared between the plain and the patched server
            _, out = ask(url, "热身。", {**LP10, "max_tokens": 8, "temperature": 0})
            same.setdefault(server_args[0], []).append(out["choices"][0]["logprobs"])
            for label, _, params in (v for v in chosen if v[1] == server_args):
                results.append((label, run_variant(url, params, [next(texts) for _ in range(args.n)])))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    demo = results[0][1]
    softmax_s, sort_s = python_logprobs_cost(int(demo["prompt_tokens"]), int(demo["completion_tokens"]))
    text = "\n\n".join([
        "<!-- written by bench/teacher_server.py -->\n## Demo teacher: where a request's time goes (`bench/teacher_server.py`)",
        f"llama-cpp-python's OpenAI-compatible server, Qwen2.5-Coder-1.5B-Instruct Q4_K_M, n_ctx 4096, one "
        f"request at a time, temperature 0.3, a 450-character chunk of data/sample_zh.txt in a question prompt; "
        f"{args.n} fresh chunks per variant, medians. Server CPU s is the server process's user + system time "
        f"over the request (all its threads): the work, whatever the load; wall s adds the wait for a core.",
        table(results),
        f"The same Python work reproduced in this process for the demo row's shape "
        f"({demo['prompt_tokens']:.0f} prompt + {demo['completion_tokens']:.0f} answer tokens, vocabulary {VOCAB}): "
        f"log-softmax over all rows {softmax_s:.1f} CPU s, one full-vocabulary Python sort per answer token "
        f"{sort_s:.1f} CPU s in all ({sort_s / demo['completion_tokens']:.2f} a token).",
        "Patched vs plain server, same greedy 8-token answer with top-10 logprobs: " +
        ("identical" if len(same.get((), [])) == 2 and same[()][0] == same[()][1] else
         "DIFFERENT" if len(same.get((), [])) == 2 else "not compared (one of the two servers not run)") + ".",
        f"Machine: {head}; load average {os.getloadavg()[0]:.2f} at the end. Whole benchmark: {time.time() - t0:.0f} s.",
        f"Command: `python bench/teacher_server.py{' --n ' + str(args.n) if args.n != 3 else ''}"
        f"{' --only ' + ' '.join(map(str, args.only)) if args.only else ''}`",
    ])
    print(text)
    if not args.no_write:
        write_section("teacher_server", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
