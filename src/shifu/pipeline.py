"""Runs stages in order, skipping those whose inputs and settings have not changed.

    from shifu.pipeline import run_stage, run_all
    run_all(load_config("configs/demo.yaml"))

Each stage is a plain function `run_<stage>(cfg) -> dict of figures`. Here, once per stage: its
fingerprint (hashes of its input files and of the settings it reads) is compared with the one in
<work_dir>/manifest.json; a match with outputs present means skip, `force` means redo. The
resolved configuration (no secrets) is written beside the outputs, and the figures of every stage
are gathered into <work_dir>/summary.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from shifu.config import Config, dump_config
from shifu.files import Manifest, write_json, write_text

log = logging.getLogger("shifu")
ORDER = ["chunk", "tasks", "teach", "dataset", "train", "merge", "eval"]


def _store_state(cfg: Config) -> list:
    """What the teacher store holds, cheaply: its answer count and last write (WAL-safe)."""
    path = cfg.work / "teacher.sqlite"
    if not path.exists():
        return []
    from shifu.store import Store

    store = Store(path)
    try:
        row = store.db.execute("SELECT COUNT(*), MAX(updated_at) FROM answers WHERE status = 'ok'").fetchone()
    finally:
        store.close()
    return list(row)


def _plan(name: str, cfg: Config) -> tuple[Callable[[Config], dict], list, list, object]:
    """(function, input paths, output paths, settings) of a stage."""
    w = cfg.work
    dump = lambda *keys: {k: getattr(cfg, k) for k in keys}  # noqa: E731
    if name == "chunk":
        from shifu.chunk import run_chunk
        from shifu.read import find_sources

        settings = [cfg.data, cfg.chunk_size, cfg.model_name if cfg.data.chunk_unit == "tokens" else None]
        return run_chunk, find_sources(cfg.raw_data_path), [w / "chunks.jsonl"], settings
    if name == "tasks":
        from shifu.tasks import run_tasks

        settings = [dump("enable_qa", "enable_article", "teacher_data_ratio"), cfg.tasks]
        return run_tasks, [w / "chunks.jsonl"], [w / "tasks.jsonl"], settings
    if name == "teach":
        from shifu.teach import run_teach

        return run_teach, [w / "tasks.jsonl"], [w / "teacher.sqlite"], [cfg.teacher, cfg.tasks.qa_per_chunk]
    if name == "dataset":
        from shifu.dataset import run_dataset

        settings = [cfg.tasks, cfg.teacher.model_dump(include={"base_url", "model", "temperature", "max_tokens",
                                                               "top_p", "top_logprobs", "extra_body", "json_mode"}),
                    cfg.eval.eval_ratio, cfg.jsonl_output_path, _store_state(cfg)]
        return run_dataset, [w / "tasks.jsonl"], [cfg.jsonl_output_path, cfg.eval_jsonl_path], settings
    if name == "train":
        from shifu.train import run_train

        settings = [cfg.model_dump(exclude={"eval", "teacher", "data", "tasks", "raw_data_path", "work_dir"}),
                    cfg.teacher.top_logprobs, _store_state(cfg) if cfg.teacher.top_logprobs else None]
        inputs = [cfg.jsonl_output_path, cfg.eval_jsonl_path]
        return run_train, inputs, [Path(cfg.output_dir) / "adapter_model.safetensors"], settings
    if name == "merge":
        from shifu.merge import run_merge

        return run_merge, [cfg.output_dir], [cfg.merged_dir / "config.json"], [cfg.model_name]
    if name == "eval":
        from shifu.evaluate import run_eval

        settings = [cfg.eval, cfg.distill, cfg.train.system_prompt, cfg.max_length]
        return run_eval, [cfg.output_dir, cfg.eval_jsonl_path], [w / "eval" / "report.json"], settings
    raise ValueError(name)


def is_main_process() -> bool:
    """Under torchrun / accelerate launch every rank runs the stage; only rank 0 writes records."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def run_stage(name: str, cfg: Config, force: bool = False) -> dict:
    fn, inputs, outputs, settings = _plan(name, cfg)
    main = is_main_process()
    cfg.work.mkdir(parents=True, exist_ok=True)
    if main:
        write_text(cfg.work / "config.yaml", dump_config(cfg))
    manifest = Manifest(cfg.work)
    fingerprint = manifest.fingerprint(inputs, [name, settings])
    if not force and manifest.is_fresh(name, fingerprint, outputs):
        log.info("%s: up to date, skipped (--force redoes it)", name)
        return {**manifest.stats(name), "skipped": True}
    log.info("%s: running", name)
    t0 = time.time()
    stats = fn(cfg)
    stats = {**stats, "stage_seconds": round(time.time() - t0, 2)}
    if not main:
        return stats
    if stats.get("complete", True):  # an incomplete teach run stays stale, so a rerun retries it
        manifest.record(name, fingerprint, stats)
    if name == "dataset":
        write_text(Path(cfg.jsonl_output_path).with_suffix(".config.yaml"), dump_config(cfg))
    _update_summary(cfg, name, stats)
    return stats


def _update_summary(cfg: Config, name: str, stats: dict) -> None:
    from shifu.files import read_json

    path = cfg.work / "summary.json"
    summary = read_json(path, {})
    summary[name] = stats
    write_json(path, summary)


def run_all(cfg: Config, force: bool = False, until: str | None = None) -> dict:
    results = {}
    for name in ORDER:
        results[name] = run_stage(name, cfg, force)
        if name == until:
            break
    return results
