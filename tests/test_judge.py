"""The judge: verdict parsing, both orders combined, prompts per language and kind, and the calls
going through the teacher runner and a store (no verdict bought twice)."""

import pytest

from shifu.judge import (
    Pair,
    combine,
    judge_pairs,
    judge_prompt,
    judge_teacher,
    parse_verdict,
    requests_for,
)


@pytest.mark.parametrize("text, want", [
    ("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"), ("  [[ b ]]\n", "B"),
    ("理由：A 更完整。\n[[A]]", "A"), ("[[A]] ... so [[A]]", "A"),
    ("", None), (None, None), ("A", None), ("平局", None), ("[[A]] or [[B]]", None), ("[[D]]", None),
    ("[A]", None),
])
def test_parse_verdict_accepts_one_kind_of_marker_only(text, want):
    assert parse_verdict(text) == want


@pytest.mark.parametrize("straight, swapped, outcome", [
    ("A", "B", "win"),     # first answer preferred in both positions
    ("B", "A", "loss"),
    ("A", "A", "tie"),     # position A preferred both times: pure position bias, a tie
    ("B", "B", "tie"),
    ("tie", "tie", "tie"),
    ("A", "tie", "win"),   # a win and a tie
    ("tie", "A", "loss"),  # swapped: position A holds the second answer
    ("A", None, "unparseable"), (None, None, "unparseable"),
])
def test_both_orders_combine_from_the_first_answers_view(straight, swapped, outcome):
    assert combine(straight, swapped) == outcome


def _pair(lang="zh", category="问答", closed=False):
    return Pair(id="x", passage="孔乙己是站着喝酒而穿长衫的唯一的人。", prompt="孔乙己穿什么？", category=category,
                lang=lang, first="FIRST-ANSWER", second="SECOND-ANSWER", closed_book=closed)


def test_prompts_swap_the_answers_and_carry_the_rubric_of_the_kind():
    p = _pair()
    straight, swapped = judge_prompt(p, False), judge_prompt(p, True)
    assert straight.index("FIRST-ANSWER") < straight.index("SECOND-ANSWER")
    assert swapped.index("SECOND-ANSWER") < swapped.index("FIRST-ANSWER")
    assert "正确" in straight and "孔乙己是站着喝酒" in straight and "[[C]]" in straight
    assert "文风" in judge_prompt(_pair(category="文章生成"), False)
    en = judge_prompt(_pair(lang="en", category="文章生成"), False)
    assert "style" in en and "[[A]]" in en and "原文" not in en
    assert "没有看到原文" in judge_prompt(_pair(closed=True), False)


def test_judge_settings_are_deterministic_and_may_name_another_server(make_config):
    cfg = make_config("http://127.0.0.1:9/v1", eval__judge_model="judge-x", eval__judge_base_url="http://127.0.0.1:8/v1")
    tc = judge_teacher(cfg)
    assert (tc.model, tc.base_url, tc.temperature, tc.top_logprobs) == ("judge-x", "http://127.0.0.1:8/v1", 0.0, 0)
    assert tc.max_tokens == cfg.eval.judge_max_tokens
    same = judge_teacher(make_config("http://127.0.0.1:9/v1"))
    assert (same.model, same.base_url) == ("fake-teacher", "http://127.0.0.1:9/v1")
    (a, b), = requests_for(cfg, [_pair()])
    assert a.key != b.key and "logprobs" not in a.params and a.params["temperature"] == 0.0


def test_judge_calls_go_through_the_runner_with_retries_and_are_never_bought_twice(make_config, fake_server):
    server = fake_server(fault_first=1, faults=["500"])  # every distinct request fails once, then answers
    cfg = make_config(server.url)
    pairs = [_pair(), _pair(lang="en", category="文章生成")]
    records, calls = judge_pairs(cfg, pairs)
    assert calls["requests"] == 4 and calls["sent"] == 4 and calls["failed"] == 0
    assert all(r["outcome"] in ("win", "tie", "loss") for r in records)
    assert all(n == 2 for n in server.requests_by_key.values())  # one fault, one answer each
    again, calls2 = judge_pairs(cfg, pairs)
    assert again == records and calls2["cached"] == 4 and calls2["sent"] == 0
    assert sum(server.requests_by_key.values()) == 8


def test_an_unparseable_verdict_is_counted_never_guessed(make_config, fake_server, monkeypatch):
    from shifu import judge

    server = fake_server()
    cfg = make_config(server.url)
    # Without the markers in the prompt the fake server answers with text, as a confused judge would.
    monkeypatch.setattr(judge, "TEMPLATE", {k: v.replace("[[", "<<").replace("]]", ">>")
                                            for k, v in judge.TEMPLATE.items()})
    p = Pair(id="y", passage="p", prompt="q", category="问答", lang="zh", first="a", second="b")
    records, _ = judge_pairs(cfg, [p])
    assert records[0]["outcome"] == "unparseable" and records[0]["straight"] is None


def test_identical_answers_are_a_tie_and_never_sent(make_config, fake_server):
    server = fake_server()
    cfg = make_config(server.url)
    same = Pair(id="same", passage="p", prompt="q", category="问答", lang="zh", first="一样的回答", second=" 一样的回答\n")
    records, calls = judge_pairs(cfg, [same, _pair()])
    assert records[0]["outcome"] == "tie" and records[0]["identical"]
    assert calls["identical_pairs"] == 1 and calls["requests"] == 2 and sum(server.requests_by_key.values()) == 2


def test_an_open_book_prompt_carries_the_passage_once():
    passage = "孔乙己是站着喝酒而穿长衫的唯一的人。"
    p = Pair(id="o", passage=passage, prompt=f"请根据下面的文本回答。\n\n{passage}\n\n问题：孔乙己穿什么？", category="问答",
             lang="zh", first="长衫", second="短衣")
    assert judge_prompt(p, False).count(passage) == 1


def test_a_missing_judge_key_is_one_line_before_any_model_loads(make_config, monkeypatch):
    from shifu.errors import UserError
    from shifu.judge import check_judge

    monkeypatch.delenv("SHIFU_TEST_JUDGE_KEY", raising=False)
    cfg = make_config("https://api.deepseek.com", teacher__api_key_env="SHIFU_TEST_JUDGE_KEY")
    with pytest.raises(UserError, match="SHIFU_TEST_JUDGE_KEY.*eval.judge: false"):
        check_judge(cfg)
    check_judge(make_config("http://127.0.0.1:9/v1"))  # a local server needs no key


def test_run_summary_states_the_judge_in_words():
    from shifu.report import judge_lines
    from shifu.stats import win_rates

    lines = judge_lines({"vs_base": win_rates(["win"] * 9 + ["loss"], seed=0), "vs_teacher": {"pairs": 0},
                         "knowledge": win_rates(["win", "loss", "unparseable"], seed=0)})
    assert lines[0].startswith("judge, trained vs base: 9 win / 0 tie / 1 loss; net +0.80") and lines[0].endswith("better")
    assert lines[1].startswith("judge, closed-book, trained vs base: 1 win / 0 tie / 1 loss, 1 unparseable")
    assert lines[1].endswith("no measurable change") and len(lines) == 2
