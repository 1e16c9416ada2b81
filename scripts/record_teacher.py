"""Record a real teacher once, so that bench/quality.py reruns in minutes without it.

    .venv/bin/python scripts/record_teacher.py                 # both languages, ~1 h 50 min on 2 cores
    .venv/bin/python scripts/record_teacher.py --langs en      # one language (resumes: nothing is asked twice)

Teacher: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from `make demo-models`) behind llama-cpp-python's
OpenAI-compatible server on 127.0.0.1, top-20 logprobs on every answer token. Prompts: shifu's own
chunk and tasks stages (question answering 问答 and continuation 文章生成, the built-in templates) over
passages of ../shared/corpus that the demo does not use: 鲁迅 (Chinese) after 《孔乙己》, and the
later chapters of *Alice's Adventures in Wonderland* (English). shifu's teach stage asks the
questions, so the recording is resumable and no request is paid twice.

Writes bench/data/teacher-<lang>.jsonl.gz: a first line of metadata (teacher file and its sha256,
server settings, the teacher and task config, the command), then every chunk, every task, and every
stored answer with its prompt (the chat messages), its text, finish reason, usage and its top-20
logprobs (shifu.logprobs.pack_logprobs, base64). bench/quality.py rebuilds a work_dir from it.
Measured here (2 cores): Chinese 291 requests in 65 min, English 273 in 44 min; prompt evaluation at
about 25-35 tokens/s is most of a request's time. 1.3 MB and 1.1 MB compressed.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import sys
import time
from pathlib import Path

from fetch_models import sha256  # the same check `make demo-models` makes of every file it fetches

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))
CORPUS = ROOT.parent / "shared" / "corpus"
TEACHER = CACHE / "gguf" / "qwen1.5b.gguf"
ALIAS = "qwen2.5-coder-1.5b-instruct"
OUT = ROOT / "bench" / "data"
WORK = ROOT / "runs" / "record-teacher"
BASE_URL = "http://127.0.0.1:8765/v1"  # part of every request's key: bench/quality.py uses the same string

# (file, first char, last char, chunk_size): about 48 chunks each, none of them in data/ or the demo.
SOURCES = {
    "zh": ("luxun_fiction.txt", 20_000, 34_500, 350),
    "en": ("english.txt", 60_000, 90_500, 800),
}


def config_tree(lang: str, base_url: str) -> dict:
    name, start, end, size = SOURCES[lang]
    folder = WORK / lang
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "corpus.txt"
    raw.write_text((CORPUS / name).read_text(encoding="utf-8")[start:end], encoding="utf-8")
    return {
        "raw_data_path": str(raw), "model_name": str(CACHE / "hf" / "qwen0.5b"),
        "work_dir": str(folder / "work"), "output_dir": str(folder / "adapter"),
        "jsonl_output_path": str(folder / "data" / "distill.jsonl"), "chunk_size": size,
        "teacher_data_ratio": 1.0,
        "tasks": {"qa_per_chunk": 4, "qa_mode": "open", "trim_truncated": True, "seed": 1},
        "teacher": {"base_url": base_url, "model": ALIAS, "extra_body": {}, "max_concurrency": 1,
                    "temperature": 0.3, "max_tokens": 112, "top_logprobs": 20, "timeout_s": 900},
    }


def prompts_by_key(cfg, tasks: list[dict], get) -> dict[str, list[dict]]:
    """Every request the teach stage sends for these tasks, by key: proposals, re-asks, answers."""
    from shifu.tasks import answer_requests, questions_for, task_request

    out = {}
    for task in tasks:
        if task["source"] != "teacher":
            continue
        for reask in (False, True):
            req = task_request(task, cfg, reask)
            out[req.key] = req.messages
        if task["parse"] == "json_qa":
            questions, _ = questions_for(task, cfg, get)
            for _, req in answer_requests(task, questions or [], cfg):
                out[req.key] = req.messages
    return out


def export(lang: str, tree: dict, teach: dict, command: str, teacher_sha: str, seconds: float) -> Path:
    from shifu.config import config_from_dict
    from shifu.files import read_jsonl
    from shifu.store import Store

    cfg = config_from_dict(tree)
    chunks, tasks = list(read_jsonl(cfg.chunks_path)), list(read_jsonl(cfg.tasks_path))
    dest = OUT / f"teacher-{lang}.jsonl.gz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Store(cfg.store_path) as store:
        prompts = prompts_by_key(cfg, tasks, store.get)
        rows = store.db.execute("SELECT key, content, finish_reason, flags, usage, logprobs, reasoning FROM answers "
                                "WHERE status = 'ok' ORDER BY key").fetchall()
    meta = {"type": "meta", "lang": lang, "teacher_file": TEACHER.name, "teacher_sha256": teacher_sha,
            "teacher_model": "Qwen2.5-Coder-1.5B-Instruct Q4_K_M", "server": "llama-cpp-python (shifu.serve)",
            "source": SOURCES[lang][:3], "config": {k: tree[k] for k in ("chunk_size", "teacher_data_ratio", "tasks",
                                                                          "teacher")},
            "command": command, "recorded_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "teach": {k: teach.get(k) for k in ("planned", "done", "failed", "seconds", "prompt_tokens", "completion_tokens")},
            "seconds": round(seconds), "answers": len(rows)}
    with gzip.open(dest, "wt", encoding="utf-8", compresslevel=9) as f:
        for obj in [meta, *({"type": "chunk", **c} for c in chunks), *({"type": "task", **t} for t in tasks)]:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        for key, content, finish, flags, usage, blob, reasoning in rows:
            f.write(json.dumps({"type": "answer", "key": key, "messages": prompts.get(key), "content": content,
                                "finish_reason": finish, "flags": json.loads(flags), "usage": json.loads(usage),
                                "reasoning": reasoning or "",
                                "logprobs": base64.b64encode(blob).decode() if blob else None},
                               ensure_ascii=False) + "\n")
    return dest


def main() -> int:
    from shifu.config import config_from_dict
    from shifu.errors import UserError
    from shifu.pipeline import run_all
    from shifu.progress import setup_logging
    from shifu.serve import llama_cpp_server

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--langs", default="zh,en")
    a = p.parse_args()
    setup_logging()
    command = " ".join([".venv/bin/python scripts/record_teacher.py", *sys.argv[1:]])
    if not (CORPUS / "english.txt").exists():
        print(f"error: {CORPUS} not found: the recording reads the shared public-domain corpus", file=sys.stderr)
        return 2
    try:
        teacher_sha = sha256(TEACHER) if TEACHER.exists() else ""
        with llama_cpp_server(TEACHER, ALIAS, WORK / "server.log", n_ctx=2048) as url:
            if url != BASE_URL:
                raise UserError(f"port 8765 is busy (the server got {url}); free it, since the recorded keys name it")
            for lang in a.langs.split(","):
                tree = config_tree(lang, url)
                t0 = time.time()
                done = run_all(config_from_dict(tree), until="teach")
                dest = export(lang, tree, done.get("teach", {}), command, teacher_sha, time.time() - t0)
                print(f"{lang}: {dest} ({dest.stat().st_size / 1e6:.2f} MB), {time.time() - t0:.0f} s", flush=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
