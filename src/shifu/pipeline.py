"""The table of stages, and the runner that skips those whose inputs and settings have not changed.

    from shifu.pipeline import run_stage, run_all
    run_all(load_config("configs/demo.yaml"))

`STAGES` is the one list of stages: the CLI makes a command of each, `run_all` runs them in order
and the report picks each one's summary fields. Each stage is a plain function
`run_<stage>(cfg) -> dict of figures`. Here, once per stage: its fingerprint (hashes of its input
files and of the settings it reads) is compared with the one in <work_dir>/manifest.json; a match
with outputs present means skip, `force` means redo. The resolved configuration (no secrets) is
written beside the outputs, and the figures of every stage are gathered into <work_dir>/summary.json.
One process at a time works in a work_dir (`shifu.lock`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shifu.config import Config, dump_config
from shifu.errors import UserError
from shifu.files import Manifest, unwritable, write_json, write_text

log = logging.getLogger("shifu")

Paths = Callable[[Config], list]

_TEACHER_ANSWER_FIELDS = {"base_url", "model", "temperature", "max_tokens", "top_p", "top_logprobs", "extra_body",
                          "json_mode"}


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    function: str  # "module:function", imported only when the stage runs, so `shifu --help` stays fast
    inputs: Paths  # files whose content keys the stage
    outputs: Paths  # present and fresh means the stage is skipped
    settings: Callable[[Config], object]  # the settings that key the stage besides its inputs
    needs: tuple[str, ...]  # stages whose outputs must exist first
    summary: tuple[str, ...]  # figures shown in the run summary


def _store_state(cfg: Config) -> list:
    """What the teacher store holds, cheaply: its answer count and last write (WAL-safe)."""
    if not cfg.store_path.exists():
        return []
    from shifu.store import Store

    with Store(cfg.store_path) as store:
        return list(store.db.execute("SELECT COUNT(*), MAX(updated_at) FROM answers WHERE status = 'ok'").fetchone())


def _sources(cfg: Config) -> list:
    from shifu.read import find_sources

    return find_sources(cfg.raw_data_path)


def _fields(cfg: Config, *names: str) -> dict:
    return {k: getattr(cfg, k) for k in names}


STAGES: tuple[Stage, ...] = (
    Stage("chunk", "Read raw_data_path and split it into chunks (work_dir/chunks.jsonl).", "shifu.chunk:run_chunk",
          _sources, lambda c: [c.chunks_path],
          lambda c: [c.data, c.chunk_size, c.model_name if c.data.chunk_unit == "tokens" else None],
          (), ("chunks", "chunk_chars", "exact_duplicates", "near_duplicates")),
    Stage("tasks", "Turn chunks into teacher tasks (work_dir/tasks.jsonl).", "shifu.tasks:run_tasks",
          lambda c: [c.chunks_path], lambda c: [c.tasks_path],
          lambda c: [_fields(c, "enable_qa", "enable_article", "teacher_data_ratio"), c.tasks],
          ("chunk",), ("tasks", "teacher_tasks", "text_tasks")),
    Stage("teach", "Have the teacher answer every task; resumable, never pays twice (work_dir/teacher.sqlite).",
          "shifu.teach:run_teach", lambda c: [c.tasks_path], lambda c: [c.store_path],
          lambda c: [c.teacher.model_dump(exclude={"allow_partial"}), c.tasks.qa_per_chunk],
          ("tasks",), ("planned", "done", "cached", "failed", "retried", "unsent", "prompt_tokens",
                       "completion_tokens", "cost", "flags", "partial")),
    Stage("dataset", "Write the Alpaca-style JSONL (jsonl_output_path and its .eval split).",
          "shifu.dataset:run_dataset", lambda c: [c.tasks_path], lambda c: [c.jsonl_output_path, c.eval_jsonl_path],
          lambda c: [c.tasks, c.teacher.model_dump(include=_TEACHER_ANSWER_FIELDS), c.eval.eval_ratio,
                     c.jsonl_output_path, _store_state(c),
                     [c.dataset.formats, c.train.system_prompt, c.train.reasoning_tag] if c.dataset.formats else None],
          ("tasks", "teach"), ("train_examples", "eval_examples", "by_category", "rejected", "unanswered")),
    Stage("train", "LoRA-train the student with LM + distillation loss (output_dir).", "shifu.train:run_train",
          lambda c: [c.jsonl_output_path, c.eval_jsonl_path],
          lambda c: [Path(c.output_dir) / "adapter_model.safetensors"],
          lambda c: [c.model_dump(exclude={"eval", "teacher", "data", "tasks", "raw_data_path", "work_dir"}),
                     c.teacher.top_logprobs, _store_state(c) if c.teacher.top_logprobs else None],
          ("dataset",), ("steps", "train_loss", "kd_source", "kd_coverage", "seconds")),
    Stage("merge", "Merge the adapter into a full safetensors model (<output_dir>_merged).", "shifu.merge:run_merge",
          lambda c: [c.output_dir], lambda c: [c.merged_dir / "config.json"], lambda c: [c.model_name],
          ("train",), ("merged_dir", "max_logit_diff")),
    Stage("eval", "Score the student before and after training on held-out chunks (work_dir/eval).",
          "shifu.evaluate:run_eval", lambda c: [c.output_dir, c.eval_jsonl_path],
          lambda c: [c.eval_dir / "report.json"],
          # the judge is the teacher unless eval.judge_model names another: a new teacher means new verdicts
          lambda c: [c.eval, c.distill, c.train.system_prompt, c.max_length,
                     c.teacher.model_dump(include={"base_url", "model"}) if c.eval.judge else None],
          ("train", "dataset"), ("before", "after", "loss_change")),
)
BY_NAME = {s.name: s for s in STAGES}
ORDER = [s.name for s in STAGES]


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise UserError(f"unknown stage {name!r}: choose one of {', '.join(ORDER)}")
    return BY_NAME[name]


def is_main_process() -> bool:
    """Under torchrun / accelerate launch every rank runs the stage; only rank 0 writes records."""
    return int(os.environ.get("RANK", "0")) == 0


def _require(st: Stage, cfg: Config) -> None:
    """A stage run before the one it reads from: say which command comes first, not FileNotFoundError."""
    for name in st.needs:
        for path in BY_NAME[name].outputs(cfg):
            if not Path(path).exists():
                raise UserError(f"{path} does not exist yet: run `shifu {name} CONFIG` first "
                                f"(or `shifu run CONFIG`, which runs every stage in order)")


def _writable(folder: Path, what: str) -> None:
    """Fail before any work on a folder that cannot be written, naming it, instead of after an hour."""
    why = unwritable(folder)
    if why:
        raise UserError(f"{what} {folder}: cannot write there, {why}; make it writable "
                        f"or point {what} at another folder")


def check_writable(cfg: Config) -> None:
    """Every folder a run writes into, checked at its start."""
    _writable(cfg.work, "work_dir")
    _writable(Path(cfg.output_dir), "output_dir")
    _writable(cfg.merged_dir.parent, "output_dir")
    _writable(Path(cfg.jsonl_output_path).parent, "jsonl_output_path")


@contextlib.contextmanager
def holding(cfg: Config, wait: bool = False):
    """Checks, then this process alone in work_dir, for a stage or a whole run."""
    from shifu.lock import work_dir_lock

    check_writable(cfg)
    with work_dir_lock(cfg.work, wait):
        yield


def run_stage(name: str, cfg: Config, force: bool = False, wait: bool = False) -> dict:
    with holding(cfg, wait):
        return _run_stage(stage(name), cfg, force)


def _run_stage(st: Stage, cfg: Config, force: bool) -> dict:
    _require(st, cfg)
    main = is_main_process()
    cfg.work.mkdir(parents=True, exist_ok=True)
    if main:
        write_text(cfg.work / "config.yaml", dump_config(cfg))
    manifest = Manifest(cfg.work)
    fingerprint = manifest.fingerprint(st.inputs(cfg), [st.name, st.settings(cfg)])
    if not force and manifest.is_fresh(st.name, fingerprint, st.outputs(cfg)):
        log.info("%s: up to date, skipped (--force redoes it)", st.name)
        return {**manifest.stats(st.name), "skipped": True}
    log.info("%s: running", st.name)
    module, function = st.function.split(":")
    t0 = time.time()
    stats = getattr(importlib.import_module(module), function)(cfg)
    stats = {**stats, "stage_seconds": round(time.time() - t0, 2)}
    if not main:
        return stats
    if stats.get("complete", True):  # an incomplete teach run stays stale, so a rerun retries it
        manifest.record(st.name, fingerprint, stats)
    if st.name == "dataset":
        write_text(Path(cfg.jsonl_output_path).with_suffix(".config.yaml"), dump_config(cfg))
    _update_summary(cfg, st.name, stats)
    if stats.get("incomplete"):  # recorded first, so the summary shows what the failed run did
        raise UserError(stats["incomplete"])
    return stats


def _update_summary(cfg: Config, name: str, stats: dict) -> None:
    from shifu.files import read_json

    summary = read_json(cfg.summary_path, {})
    summary[name] = stats
    write_json(cfg.summary_path, summary)


def run_all(cfg: Config, force: bool = False, until: str | None = None, wait: bool = False) -> dict:
    if until is not None:
        stage(until)  # an unknown name fails before anything runs
    results = {}
    with holding(cfg, wait):
        for st in STAGES:
            results[st.name] = _run_stage(st, cfg, force)
            if st.name == until:
                break
    return results
