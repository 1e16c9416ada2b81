"""Interval arithmetic on hand-made cases: paired changes, ratio-of-sums, win rates."""

import pytest

from shifu.stats import NO_CHANGE, paired_change, verdict, win_rates


def test_a_consistent_gain_is_better_and_its_interval_excludes_zero():
    before = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    after = [b + 1.0 for b in before]
    c = paired_change(before, after)
    assert c["before"] == pytest.approx(3.5) and c["after"] == pytest.approx(4.5) and c["change"] == pytest.approx(1.0)
    assert c["ci"] == pytest.approx([1.0, 1.0])  # every example gained exactly 1: no spread
    assert c["verdict"] == "better"


def test_noise_around_zero_is_no_measurable_change():
    before = [0.0] * 8
    after = [1.0, -1.0, 2.0, -2.0, 1.0, -1.0, 0.5, -0.5]
    c = paired_change(before, after)
    assert c["change"] == pytest.approx(0.0)
    assert c["ci"][0] < 0 < c["ci"][1] and c["verdict"] == NO_CHANGE


def test_lower_is_better_for_a_loss():
    c = paired_change([2.0, 2.1, 2.2, 2.3], [1.0, 1.1, 1.2, 1.3], higher_is_better=False)
    assert c["change"] == pytest.approx(-1.0) and c["verdict"] == "better"
    assert paired_change([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], higher_is_better=False)["verdict"] == "worse"


def test_weighted_figures_are_token_averages_not_means_of_means():
    # example 1: 10 tokens summing to 10 (mean 1); example 2: 1 token of 5 (mean 5)
    c = paired_change([10.0, 5.0], [10.0, 5.0], weights=[10, 1])
    assert c["before"] == pytest.approx(15 / 11) and c["change"] == 0.0
    assert c["ci"] == pytest.approx([0.0, 0.0]) and c["verdict"] == NO_CHANGE


def test_one_example_has_no_interval():
    c = paired_change([1.0], [2.0])
    assert c["ci"] is None and c["verdict"].startswith(NO_CHANGE)


def test_verdict_at_the_edges():
    assert verdict([0.0, 1.0]) == NO_CHANGE and verdict([0.1, 1.0]) == "better" and verdict([-1.0, -0.1]) == "worse"
    assert verdict([-1.0, -0.1], higher_is_better=False) == "better"


def test_win_rates_count_unparseable_apart_and_rate_the_rest():
    outcomes = ["win"] * 6 + ["tie"] * 2 + ["loss"] * 2 + ["unparseable"] * 3
    r = win_rates(outcomes)
    assert (r["win"], r["tie"], r["loss"], r["unparseable"], r["pairs"], r["judged"]) == (6, 2, 2, 3, 13, 10)
    assert r["win_rate"] == pytest.approx(0.6) and r["tie_rate"] == pytest.approx(0.2)
    assert r["loss_rate"] == pytest.approx(0.2) and r["net"] == pytest.approx(0.4)
    lo, hi = r["win_ci"]
    assert 0 <= lo < 0.6 < hi <= 1


def test_all_wins_is_better_all_ties_is_no_change():
    assert win_rates(["win"] * 10)["verdict"] == "better"
    assert win_rates(["loss"] * 10)["verdict"] == "worse"
    assert win_rates(["tie"] * 10)["verdict"] == NO_CHANGE
    assert win_rates(["unparseable"] * 3)["verdict"] == "no parseable verdicts"


def test_change_chart_draws_a_one_point_interval_off_its_estimate_by_rounding(tmp_path):
    from shifu.plots import change_chart

    # the demo's top-1 agreement: one example, so the interval is one point a rounding error from the estimate
    changes = {"top1_agreement": {"before": 0.8276, "after": 0.8966, "change": 0.06896551724137934,
                                  "ci": [0.06896551724137945, 0.06896551724137945], "verdict": "better"},
               "loss": {"before": 4.48, "after": 3.95, "change": -0.53, "ci": [-0.69, -0.002], "verdict": "better"}}
    assert change_chart(changes, tmp_path / "changes.png")
    assert (tmp_path / "changes.png").stat().st_size > 1000
