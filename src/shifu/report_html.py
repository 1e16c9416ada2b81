"""`<work_dir>/eval/report.html`: the one page a person opens after a run.

A single self-contained file (figures as base64 PNGs, inline CSS, no script, no network): the
run's figures, before/after with intervals, the judge's verdicts, closed-book knowledge, overlap
with the teacher, general ability, loss curves, the rejected-data summary and side-by-side samples.
"""

from __future__ import annotations

import base64
import tempfile
from collections import Counter
from html import escape
from pathlib import Path

from shifu.config import Config
from shifu.files import read_json, read_jsonl

SECTIONS = ("run", "held-out", "judge", "knowledge", "overlap", "general", "loss-curves", "rejected", "samples")
CSS = """body{font-family:system-ui,'Noto Sans CJK SC','PingFang SC',sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}h1{margin-bottom:0}table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}.better{color:#1a7f37;font-weight:600}
.worse{color:#c62828;font-weight:600}.same{color:#666}.note{color:#666;font-size:.9em}img{max-width:100%}
.side{display:grid;grid-template-columns:repeat(3,1fr);gap:8px}.side div{background:#fafafa;border:1px solid #ddd;
padding:6px;white-space:pre-wrap;font-size:.9em}pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;font-size:.85em}"""


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else escape(str(x))


def _ci(ci) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "–"


def _verdict(v: str) -> str:
    cls = "better" if v == "better" else "worse" if v == "worse" else "same"
    return f'<span class="{cls}">{escape(v)}</span>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return f'<p class="note">no {escape(alt)} figure</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{escape(title)}</h2>{body}</section>'


def _changes_table(changes: dict) -> str:
    rows = [[escape(name), _num(c["before"]), _num(c["after"]), _num(c["change"]), _ci(c.get("ci")),
             _verdict(c["verdict"])] for name, c in changes.items()]
    return _table(["figure", "before", "after", "change", "95% interval", "verdict"], rows)


def _run(cfg: Config) -> str:
    summary = read_json(cfg.summary_path, {})
    picks = {"chunk": ["chunks"], "tasks": ["tasks", "teacher_tasks"], "teach": ["done", "failed", "cost"],
             "dataset": ["train_examples", "eval_examples", "rejected"], "train": ["steps", "train_loss", "kd_source"],
             "merge": ["max_logit_diff"]}
    rows = [[stage, escape(", ".join(f"{k}={_num(summary[stage][k])}" for k in keys if k in summary[stage]))]
            for stage, keys in picks.items() if stage in summary]
    head = (f"<p>student <code>{escape(cfg.model_name)}</code>, teacher <code>{escape(cfg.teacher.model)}</code>"
            f" at <code>{escape(cfg.teacher.base_url)}</code></p>")
    return head + (_table(["stage", "figures"], rows) if rows else '<p class="note">no run summary yet</p>')


def _held_out(report: dict, figures: Path) -> str:
    from shifu.plots import change_chart

    path = figures / "changes.png"
    drawn = change_chart(report["changes"], path)
    return (f"<p>{report['held_out_examples']} held-out examples (chunks never trained on), teacher-forced on "
            "the teacher's answers. A change whose interval contains zero is no measurable change.</p>"
            + _changes_table(report["changes"]) + (_img(path, "before/after changes") if drawn else ""))


def _rate(r: dict, k: str) -> str:
    return f"{_num(r.get(f'{k}_rate'), 3)} {_ci(r.get(f'{k}_ci'))}"


def _judge_rows(results: dict, names: list[str]) -> list[list[str]]:
    rows = []
    for name in names:
        r = results.get(name) or {}
        if "pairs" not in r:
            continue
        rows.append([escape(name), str(r["pairs"]), _rate(r, "win"), _rate(r, "tie"), _rate(r, "loss"), str(r["unparseable"]),
                     f"{_num(r.get('net'), 3)} {_ci(r.get('net_ci'))}", _verdict(r["verdict"])])
    return rows


JUDGE_HEAD = ["comparison", "pairs", "win (95% CI)", "tie", "loss", "unparseable", "net = win - loss", "verdict"]


def _judge(report: dict, figures: Path) -> str:
    from shifu.plots import judge_chart

    j = report.get("judge") or {}
    if "skipped" in j:
        return f'<p class="note">{escape(j["skipped"])}</p>'
    calls = j.get("calls", {})
    path = figures / "judge.png"
    drawn = judge_chart({k: j[k] for k in ("vs_base", "vs_teacher", "knowledge") if k in j}, path)
    return (f"<p>Judge <code>{escape(str(j.get('model')))}</code>, each pair asked in both orders; outcomes are the "
            f"trained student's. Requests {calls.get('requests', 0)} ({calls.get('cached', 0)} already stored), "
            f"cost {_num(calls.get('cost'))}.</p>"
            + _table(JUDGE_HEAD, _judge_rows(j, ["vs_base", "vs_teacher"])) + (_img(path, "judge") if drawn else ""))


def _knowledge(report: dict, knowledge: list[dict]) -> str:
    j = report.get("judge") or {}
    rows = _judge_rows(j, ["knowledge"])
    intro = ("<p>Closed-book questions about chunks the student was trained on: the question alone, no passage; "
             "judged against the passage. This is whether the corpus's knowledge went into the student.</p>")
    samples = "".join(f"<h3>{escape(q['question'])}</h3>" + _side(q["base"], q["trained"], q["passage"], "passage")
                      for q in knowledge[:3])
    return intro + (_table(JUDGE_HEAD, rows) if rows else '<p class="note">no knowledge questions judged</p>') + samples


def _overlap(report: dict) -> str:
    o = report.get("overlap") or {}
    if not o:
        return '<p class="note">no generated answers</p>'
    corpus = "; ".join(f"{lang}: base {_num(v['base'], 3)}, trained {_num(v['trained'], 3)}"
                       for lang, v in o.get("corpus_bleu", {}).items())
    return ("<p>Against the teacher's answers to the same held-out prompts (0-100): ROUGE-L on characters for "
            "Chinese, words for English; sentence BLEU with sacrebleu's zh tokenizer for Chinese.</p>"
            + _changes_table({k: o[k] for k in ("rouge_l", "bleu") if k in o})
            + f"<p>corpus BLEU: {escape(corpus)}</p>")


def _general(report: dict) -> str:
    g = report.get("general") or {}
    if not g:
        return '<p class="note">not run: name lm-evaluation-harness tasks in eval.lm_eval_tasks (lm-eval extra)</p>'
    return _changes_table({f"{task} {m}": c for task, ms in g.items() for m, c in ms.items()})


def _rejected(cfg: Config) -> str:
    path = cfg.rejected_path
    rows = list(read_jsonl(path)) if path.exists() else []
    if not rows:
        return "<p>no teacher output was rejected</p>"
    counts = Counter(r.get("reason", "?") for r in rows)
    table = _table(["reason", "outputs"], [[escape(k), str(v)] for k, v in counts.most_common()])
    shown = "".join(f"<p><b>{escape(r.get('reason', '?'))}</b> (chunk {r.get('chunk_id')})</p>"
                    f"<pre>{escape(str(r.get('output', ''))[:300])}</pre>" for r in rows[:5])
    return f"<p>{len(rows)} teacher outputs left out of training ({escape(str(path))}).</p>{table}{shown}"


def _side(base: str, trained: str, third: str, third_name: str) -> str:
    cells = (("base student", base), ("trained student", trained), (third_name, third))
    return '<div class="side">' + "".join(f"<div><b>{n}</b>\n{escape(t)}</div>" for n, t in cells) + "</div>"


def _samples(samples: list[dict], records: list[dict]) -> str:
    verdicts = {r["id"]: r["outcome"] for r in records}
    parts = []
    for k, s in enumerate(samples):
        v = verdicts.get(f"base:{k}")
        parts.append(f"<h3>{k + 1}. {escape(s['category'])} (chunk {s['chunk_id']})"
                     + (f" – judge: trained {escape(v)} vs base" if v else "") + "</h3>"
                     f"<pre>{escape(s['prompt'][:1200])}</pre>" + _side(s["base"], s["trained"], s["teacher"], "teacher"))
    return "".join(parts) or '<p class="note">no samples</p>'


def render_report(cfg: Config, report: dict, samples: list[dict], knowledge: list[dict]) -> str:
    loss_png = Path(cfg.output_dir) / "loss_curve.png"
    records = ((report.get("judge") or {}).get("vs_base") or {}).get("records", [])
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp)
        body = [
            _section("run", "The run", _run(cfg)),
            _section("held-out", "Held-out chunks: before and after training", _held_out(report, figures)),
            _section("judge", "Judged comparison on held-out prompts", _judge(report, figures)),
            _section("knowledge", "Knowledge of the trained chunks (closed book)", _knowledge(report, knowledge)),
            _section("overlap", "Overlap with the teacher's answers", _overlap(report)),
            _section("general", "General ability (lm-evaluation-harness)", _general(report)),
            _section("loss-curves", "Loss curves", _img(loss_png, "loss curve")),
            _section("rejected", "Rejected teacher data", _rejected(cfg)),
            _section("samples", "Samples: base, trained, teacher", _samples(samples[: max(cfg.eval.num_samples, 1)],
                                                                            records)),
        ]
    return ("<!doctype html><html lang=\"zh\"><head><meta charset=\"utf-8\"><title>shifu evaluation</title>"
            f"<style>{CSS}</style></head><body><h1>shifu evaluation</h1>"
            f"<p class=\"note\">{escape(str(cfg.work))}</p>{''.join(body)}</body></html>")
