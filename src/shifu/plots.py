"""The loss curve (train and evaluation) as a PNG beside the adapter."""

from __future__ import annotations

from pathlib import Path


def loss_curve(log_history: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not held:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for points, label in ((train, "train"), (held, "held-out")):
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=100)


def change_chart(changes: dict[str, dict], path: Path) -> bool:
    """Each before -> after change in percent of its before value (so a loss and an agreement share
    one axis), with its 95% interval; zero marked, green better, red worse, grey no measurable change."""
    rows = [(name, c) for name, c in changes.items() if c.get("ci") and c["before"]]
    if not rows:
        return False
    plt, fig, ax = _figure(6, 0.6 * len(rows) + 1.2)
    for y, (_, c) in enumerate(rows):
        scale = 100 / abs(c["before"])
        mid, lo, hi = c["change"] * scale, c["ci"][0] * scale, c["ci"][1] * scale
        color = {"better": "tab:green", "worse": "tab:red"}.get(c["verdict"], "tab:gray")
        # a one-point interval can sit a rounding error off its estimate; matplotlib refuses negative bars
        ax.errorbar(mid, y, xerr=[[max(mid - lo, 0.0)], [max(hi - mid, 0.0)]], fmt="o", color=color, capsize=4)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlabel("change, % of before (95% bootstrap interval)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def judge_chart(results: dict[str, dict], path: Path) -> bool:
    """Win / tie / loss shares of the trained student per comparison, as stacked bars."""
    rows = [(name, r) for name, r in results.items() if r.get("judged")]
    if not rows:
        return False
    plt, fig, ax = _figure(6, 0.6 * len(rows) + 1.2)
    for y, (_, r) in enumerate(rows):
        left = 0.0
        for key, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
            share = r[f"{key}_rate"]
            ax.barh(y, share, left=left, color=color, label=key if y == 0 else None)
            left += share
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judged pairs (trained student's view)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
