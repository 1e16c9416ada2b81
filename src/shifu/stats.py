"""Confidence intervals for the evaluation: a bootstrap over examples, paired where the same
examples are measured twice (before and after training).

    paired_change(before=[...], after=[...])             # mean per example
    paired_change(before=ce_base, after=ce_trained, weights=tokens)   # token-averaged loss
    win_rates(["win", "tie", "loss", "unparseable"])      # judged pairs

A change whose 95% interval contains zero is reported as `no measurable change`: with a handful
of held-out examples most differences are noise, and a report that calls them gains misleads.
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
NO_CHANGE = "no measurable change"


def _resample(n: int, samples: int, seed: int) -> np.ndarray:
    """Index matrix (samples, n): the same resampled examples for every quantity of one comparison."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _interval(draws: np.ndarray) -> list[float]:
    lo, hi = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def ratio(values: np.ndarray, weights: np.ndarray) -> float:
    total = float(weights.sum())
    return float(values.sum() / total) if total else float("nan")


def paired_change(before, after, weights=None, samples: int = 1000, seed: int = 0,
                  higher_is_better: bool = True) -> dict:
    """Before, after and after - before, with a bootstrap interval on the change.

    Without weights the figures are means per example. With weights, `before` and `after` are
    per-example sums (e.g. cross-entropy summed over an example's tokens) and `weights` the
    per-example counts, so each figure is a ratio of sums: a token average, resampled by example."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=float)
    assert b.shape == a.shape == w.shape and b.ndim == 1, "one value per example on each side"
    out = {"before": ratio(b, w), "after": ratio(a, w), "n": len(b)}
    out["change"] = out["after"] - out["before"]
    if len(b) < 2:
        return {**out, "ci": None, "verdict": f"{NO_CHANGE} (fewer than 2 examples)"}
    idx = _resample(len(b), samples, seed)
    wsum = w[idx].sum(1)
    wsum[wsum == 0] = np.nan
    draws = (a[idx].sum(1) - b[idx].sum(1)) / wsum
    ci = _interval(draws[~np.isnan(draws)])
    return {**out, "ci": ci, "verdict": verdict(ci, higher_is_better)}


def verdict(ci: list[float] | None, higher_is_better: bool = True) -> str:
    if ci is None or ci[0] <= 0 <= ci[1]:
        return NO_CHANGE
    better = (ci[0] > 0) == higher_is_better
    return "better" if better else "worse"


OUTCOMES = ("win", "tie", "loss")


def win_rates(outcomes: list[str], samples: int = 1000, seed: int = 0) -> dict:
    """Win / tie / loss rates over the pairs whose verdicts parsed, each with a bootstrap interval,
    and the net score (wins - losses) / pairs with its own: above zero with its interval means the
    first side is measurably preferred. Unparseable pairs are counted and left out of the rates."""
    counts = {k: outcomes.count(k) for k in (*OUTCOMES, "unparseable")}
    parsed = np.array([o for o in outcomes if o in OUTCOMES])
    out: dict = {**counts, "pairs": len(outcomes), "judged": len(parsed)}
    if len(parsed) == 0:
        return {**out, "verdict": "no parseable verdicts"}
    score = (parsed == "win").astype(float) - (parsed == "loss").astype(float)
    idx = _resample(len(parsed), samples, seed) if len(parsed) >= 2 else None
    for k in OUTCOMES:
        hit = (parsed == k).astype(float)
        out[f"{k}_rate"] = float(hit.mean())
        out[f"{k}_ci"] = _interval(hit[idx].mean(1)) if idx is not None else None
    out["net"] = float(score.mean())
    out["net_ci"] = _interval(score[idx].mean(1)) if idx is not None else None
    out["verdict"] = verdict(out["net_ci"])
    return out
