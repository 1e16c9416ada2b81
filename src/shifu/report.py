"""What a run prints: one table per stage, and the run summary at the end."""

from __future__ import annotations

import json

from rich.table import Table

from shifu.config import Config
from shifu.files import read_json
from shifu.progress import console


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)[:120]
    return str(value)


def print_stage(name: str, stats: dict) -> None:
    table = Table(title=f"shifu {name}", show_header=False, title_justify="left")
    for key, value in stats.items():
        table.add_row(key, _fmt(value))
    console.print(table)


def print_summary(cfg: Config) -> None:
    summary = read_json(cfg.work / "summary.json", {})
    table = Table(title=f"run summary ({cfg.work / 'summary.json'})", title_justify="left")
    table.add_column("stage")
    table.add_column("figures")
    picks = {
        "chunk": ["chunks", "chunk_chars", "exact_duplicates", "near_duplicates"],
        "tasks": ["tasks", "teacher_tasks", "text_tasks"],
        "teach": ["planned", "done", "cached", "failed", "retried", "prompt_tokens", "completion_tokens", "cost", "flags"],
        "dataset": ["train_examples", "eval_examples", "by_category", "rejected"],
        "train": ["steps", "train_loss", "kd_source", "kd_coverage", "seconds"],
        "merge": ["merged_dir", "max_logit_diff"],
        "eval": ["before", "after", "loss_change"],
    }
    for stage, keys in picks.items():
        stats = summary.get(stage)
        if stats:
            text = ", ".join(f"{k}={_fmt(stats[k])}" for k in keys if k in stats)
            extra = f" ({stats['stage_seconds']}s)" if "stage_seconds" in stats else " (skipped)"
            table.add_row(stage, text + extra)
    console.print(table)
