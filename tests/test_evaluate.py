"""Evaluation: batched scoring and generation agree with one example at a time, closed-book
questions come only from trained chunks, and a whole `shifu run` writes report.json and a
self-contained report.html with every section."""

import json
import re

import numpy as np
import pytest
from conftest import SAMPLE_ZH, run_shifu, write_config

from shifu.encode import encode_examples
from shifu.evaluate import batches, generate, knowledge_questions, score
from shifu.models import load_causal_lm, load_tokenizer
from shifu.report_html import SECTIONS

EXAMPLES = [
    {"instruction": "孔乙己是谁？", "input": "", "output": "孔乙己是站着喝酒而穿长衫的唯一的人。"},
    {"instruction": "Continue the passage.", "input": "The tavern in Luzhen", "output": "is laid out differently."},
    {"instruction": "续写", "input": "鲁镇的酒店的格局，是和别处不同的：", "output": "都是当街一个曲尺形的大柜台，柜里面预备着热水，可以随时温酒。"},
]


def test_batches_group_longest_first_and_cover_every_index():
    got = batches([3, 9, 1, 7, 5], 2)
    assert got == [[1, 3], [4, 0], [2]]
    assert sorted(i for b in batches(list(range(11)), 4) for i in b) == list(range(11))


@pytest.fixture(scope="module")
def student(tiny_student):
    return load_tokenizer(str(tiny_student)), load_causal_lm(str(tiny_student)).eval()


def test_batched_scoring_equals_one_example_at_a_time(student):
    tok, model = student
    enc = encode_examples(tok, EXAMPLES, 128)
    one = score(model, enc, None, tok.pad_token_id, 1, "cpu")
    many = score(model, enc, None, tok.pad_token_id, 3, "cpu")
    assert one[:, 1].tolist() == [len(x) - s for x, s in zip(enc.input_ids, enc.answer_start)]
    np.testing.assert_allclose(many, one, rtol=1e-4, atol=1e-4)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(student):
    tok, model = student
    prompts = ["孔乙己是谁？", "Tell me about the tavern in Luzhen and the people who drink there.", "酒"]
    alone = [generate(model, tok, [p], 6, None, 1, "cpu")[0] for p in prompts]
    together = generate(model, tok, prompts, 6, None, 3, "cpu")
    assert together == alone
    assert tok.padding_side == "right"  # restored for the scoring and training code


def test_closed_book_questions_come_only_from_trained_chunks(make_config):
    cfg = make_config()
    tasks = [{"task_id": f"{c}-qa", "chunk_id": c, "kind": "qa", "lang": "zh", "category": "问答",
              "source": "teacher", "parse": "json_qa", "instruction": f"chunk {c}: 提出问题", "input": f"文本{c}"}
             for c in range(6)]
    tasks.append({**tasks[0], "task_id": "0-article", "kind": "article", "parse": "text", "category": "文章生成"})
    split = {0: "train", 1: "eval", 2: "train", 3: "train", 4: "eval"}  # chunk 5 has no example at all
    examples = [{"chunk_id": c, "split": s} for c, s in split.items()]

    def get(key):  # every proposal holds two questions that name their chunk
        n = next(t["chunk_id"] for t in tasks if t["parse"] == "json_qa"
                 and key in {__import__("shifu.tasks", fromlist=["x"]).task_request(t, cfg, r).key for r in (0, 1)})
        return {"content": json.dumps({"questions": [f"第{n}块的第一个问题？", f"第{n}块的第二个问题？"]})}

    picked = knowledge_questions(tasks, examples, get, cfg, 10)
    assert {q["chunk_id"] for q in picked} == {0, 2, 3}
    assert all(q["question"].startswith(f"第{q['chunk_id']}块") for q in picked)
    first = knowledge_questions(tasks, examples, get, cfg, 3)  # first questions of every chunk come first
    assert sorted(q["chunk_id"] for q in first) == [0, 2, 3] and all("第一个" in q["question"] for q in first)
    assert first == knowledge_questions(tasks, examples, get, cfg, 3)  # deterministic


def test_shifu_run_writes_a_report_with_every_section(make_config, fake_server, tiny_student, tmp_path):
    from conftest import ROOT

    server = fake_server(tokenizer=str(tiny_student))
    general = {}
    try:
        import lm_eval  # noqa: F401

        general = {"eval__lm_eval_tasks": ["shifu_tiny_mc"], "eval__lm_eval_include": str(ROOT / "tests/data/lm_eval"),
                   "eval__lm_eval_limit": 4}
    except ImportError:
        pass
    cfg = make_config(server.url, raw=SAMPLE_ZH, teacher__top_logprobs=5, train__max_steps=3,
                      eval__generate_examples=3, eval__knowledge_questions=2, **general)
    proc = run_shifu("run", write_config(cfg, tmp_path / "tiny.yaml"), env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((cfg.work / "eval" / "report.json").read_text(encoding="utf-8"))
    for key in ("before", "after", "changes", "judge", "overlap", "general", "seconds"):
        assert key in report, key
    assert set(report["changes"]) >= {"loss", "top1_agreement", "kl_teacher_student"}
    assert all("ci" in c and "verdict" in c for c in report["changes"].values())
    judge = report["judge"]
    assert judge["vs_base"]["pairs"] == judge["vs_teacher"]["pairs"] == 3 and judge["knowledge"]["pairs"] == 2
    asked = 3 + 3 + 2 - judge["calls"]["identical_pairs"]  # identical answers are a tie, never sent
    assert judge["calls"]["requests"] <= 2 * asked and judge["calls"]["failed"] == 0
    assert {"rouge_l", "bleu", "corpus_bleu"} <= set(report["overlap"])
    if general:
        assert report["general"]["shifu_tiny_mc"]["acc"]["n"] == 4
    summary = json.loads((cfg.work / "summary.json").read_text(encoding="utf-8"))
    assert "records" not in summary["eval"]["judge"]["vs_base"] and "calls" in summary["eval"]["judge"]
    html = (cfg.work / "eval" / "report.html").read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    assert html.count("data:image/png;base64,") >= 3  # changes, judge, loss curve, all inside the file
    assert not re.search(r"""(src|href)=["']https?:""", html)  # nothing fetched from elsewhere
    assert "no measurable change" in html or "better" in html


def _report_fixture() -> dict:
    from shifu.stats import paired_change, win_rates

    change = paired_change([2.0, 2.2, 2.4, 2.1], [1.5, 1.9, 2.0, 1.8], higher_is_better=False)
    judged = {**win_rates(["win", "win", "tie", "loss"]), "records": [{"id": "base:0", "outcome": "win"}]}
    return {"held_out_examples": 4, "changes": {"loss": change}, "overlap": {"rouge_l": change, "bleu": change},
            "judge": {"model": "judge", "calls": {"requests": 8, "cached": 0, "cost": 0.01},
                      "vs_base": judged, "vs_teacher": judged, "knowledge": judged}, "general": {}}


def test_report_html_is_self_contained_and_escapes_what_models_wrote(make_config):
    from shifu.report_html import render_report

    cfg = make_config()
    sample = {"chunk_id": 1, "category": "问答", "prompt": "孔乙己是谁？", "base": "<script>alert(1)</script>",
              "trained": "读书人", "teacher": "孔乙己是穿长衫的读书人。"}
    html = render_report(cfg, _report_fixture(), [sample], [])
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert all(f'<section id="{s}">' in html for s in SECTIONS)
    assert "judge: trained win vs base" in html


@pytest.mark.slow  # needs Debian's chromium: apt-get install chromium fonts-noto-cjk
def test_report_renders_in_headless_chromium(make_config, tmp_path):
    import shutil
    import subprocess

    from PIL import Image

    from shifu.report_html import render_report

    browser = shutil.which("chromium") or pytest.skip("chromium is not installed")
    cfg = make_config()
    sample = {"chunk_id": 1, "category": "问答", "prompt": "孔乙己是谁？", "base": "不知道", "trained": "读书人",
              "teacher": "孔乙己是穿长衫的读书人。"}
    page = tmp_path / "report.html"
    page.write_text(render_report(cfg, _report_fixture(), [sample], []), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,3000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 3000)
    dark = sum(image.histogram()[:128]) / (1200 * 3000)
    assert 0.005 < dark < 0.5  # text and figures drawn on a white page, not a blank or error page


def test_estimate_counts_the_judge_requests_and_times_the_student(make_config):
    from shifu.eval_plan import eval_estimate
    from shifu.pipeline import run_stage

    cfg = make_config(eval__generate_examples=3, eval__knowledge_questions=2, eval__max_examples=50,
                      teacher__prices={"fake-teacher": {"input_cache_hit": 0.1, "input_cache_miss": 1.0, "output": 2.0}})
    run_stage("chunk", cfg)
    est = eval_estimate(cfg)
    assert est["prompts_answered"] == 3 and est["knowledge_questions"] == 2
    assert est["judge_requests"] == 2 * (2 * 3 + 2)  # both orders; vs base, vs teacher, knowledge vs base
    assert est["judge_max_cost"] > 0 and est["judge_input_tokens"] > 0
    assert isinstance(est["student_seconds"], float) and "cpu" in est["time_assumes"]
    assert eval_estimate(make_config(eval__judge=False))["judge_requests"] == 0


def test_answered_examples_are_spread_over_chunks_and_kinds():
    from shifu.evaluate import spread

    held = [{"chunk_id": c, "category": k, "n": i} for i, (c, k) in enumerate(
        [(1, "问答"), (1, "问答"), (1, "问答"), (1, "文章生成"), (2, "问答"), (2, "问答"), (3, "文章生成")])]
    picked = spread(held, 4)
    assert [(e["chunk_id"], e["category"]) for e in picked] == [(1, "问答"), (1, "文章生成"), (2, "问答"), (3, "文章生成")]
    assert len(spread(held, 100)) == len(held) and spread(held, 0) == []
