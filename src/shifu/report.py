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
    from shifu.pipeline import STAGES

    summary = read_json(cfg.summary_path, {})
    table = Table(title=f"run summary ({cfg.summary_path})", title_justify="left")
    table.add_column("stage")
    table.add_column("figures")
    for st in STAGES:
        stats = summary.get(st.name)
        if stats:
            text = ", ".join(f"{k}={_fmt(stats[k])}" for k in st.summary if k in stats)
            extra = f" ({stats['stage_seconds']}s)" if "stage_seconds" in stats else " (skipped)"
            table.add_row(st.name, text + extra)
    console.print(table)
    for line in judge_lines(summary.get("eval", {}).get("judge", {})):
        console.print(line, highlight=False)
    teach, dataset = summary.get("teach", {}), summary.get("dataset", {})
    if teach.get("partial") or dataset.get("unanswered"):
        console.print(f"[yellow]partial teacher run[/]: {dataset.get('unanswered', '?')} teacher tasks had no "
                      "answer and were left out of the dataset; rerun `shifu teach` to complete it",
                      highlight=False)


_JUDGED = {"vs_base": "trained vs base", "vs_teacher": "trained vs teacher", "knowledge": "closed-book, trained vs base"}


def judge_lines(judge: dict) -> list[str]:
    """The judge's verdicts in words: counts, net preference and whether its interval excludes zero."""
    lines = []
    for key, label in _JUDGED.items():
        r = judge.get(key)
        if not r or not r.get("pairs"):
            continue
        text = f"judge, {label}: {r['win']} win / {r['tie']} tie / {r['loss']} loss"
        if r.get("unparseable"):
            text += f", {r['unparseable']} unparseable"
        if r.get("net_ci"):
            lo, hi = r["net_ci"]
            text += f"; net {r['net']:+.2f} (95% CI {lo:+.2f} to {hi:+.2f}): {r['verdict']}"
        lines.append(text)
    return lines
