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
