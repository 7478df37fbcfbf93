"""Loss curves of a training stage, from a `Trainer`'s log history, as a PNG (matplotlib's Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path


def loss_keys(log_history: list[dict]) -> list[str]:
    """The logged training losses (`loss` first, then its parts such as `loss_contrastive`), in first-seen order."""
    keys: dict[str, None] = {}
    for entry in log_history:
        for key in entry:
            if key == "loss" or (key.startswith("loss_") and not key.startswith("eval_")):
                keys.setdefault(key, None)
    return sorted(keys, key=lambda k: (k != "loss", list(keys).index(k)))


def first_last_losses(log_history: list[dict]) -> dict[str, tuple[float, float]]:
    """`{loss name: (first logged value, last logged value)}` for every logged training loss."""
    out = {}
    for key in loss_keys(log_history):
        values = [entry[key] for entry in log_history if key in entry]
        out[key] = (float(values[0]), float(values[-1]))
    return out


def plot_losses(log_history: list[dict], path, title: str = "") -> str | None:
    """Each logged loss against the training step, one panel per loss, saved to `path` (PNG). Returns the path, or
    None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = loss_keys(log_history)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=2.5, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


__all__ = ["first_last_losses", "loss_keys", "plot_losses"]
