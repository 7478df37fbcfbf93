"""Figures as PNGs (matplotlib's Agg backend: no display): the loss curves of a training stage, from a `Trainer`'s
log history, and the per-gene statistics of pseudo-cells against real cells for marker genes."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_losses(log_history: list[dict], path, title: str = "") -> str | None:
    """Each logged loss against the training step, one panel per loss, saved to `path` (PNG). Returns the path, or
    None when nothing was logged."""
    plt = _pyplot()

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


GENERATOR_MARKERS = ("o", "^", "s", "D")  # one marker shape per generator


def marker_gene_statistics(real: np.ndarray, real_labels, cells: np.ndarray, labels, gene_names: list[str],
                           markers: dict[str, list[str]], min_cells: int = 2) -> dict[str, np.ndarray]:
    """Per (type, marker gene) pair, the real and generated mean and variance: {"type", "gene", "real_mean",
    "generated_mean", "real_variance", "generated_variance"}, each (pairs,); types with fewer than `min_cells` real
    cells, or none generated, are left out. `real`, `cells`: (cells, genes) log1p values over `gene_names`."""
    column = {gene: j for j, gene in enumerate(gene_names)}
    real_labels, labels = np.asarray(real_labels), np.asarray(labels)
    out = {key: [] for key in ("type", "gene", "real_mean", "generated_mean", "real_variance", "generated_variance")}
    for cell_type, genes in markers.items():
        ours, theirs = cells[labels == cell_type], real[real_labels == cell_type]
        if len(theirs) < min_cells or len(ours) == 0:
            continue
        for gene in genes:
            j = column[gene]
            for key, value in (("type", cell_type), ("gene", gene), ("real_mean", theirs[:, j].mean()),
                               ("generated_mean", ours[:, j].mean()), ("real_variance", theirs[:, j].var()),
                               ("generated_variance", ours[:, j].var())):
                out[key].append(value)
    return {key: np.asarray(values) for key, values in out.items()}


def plot_marker_genes(real: np.ndarray, real_labels, generated: dict, gene_names: list[str],
                      markers: dict[str, list[str]], path, min_cells: int = 2) -> str:
    """Two panels, per-gene mean and per-gene variance, generated (y) against real (x), one point per (type, marker
    gene), coloured by type, one marker shape per generator in `generated` ({name: (cells, labels)}); the diagonal
    is a perfect match. Saved to `path` (PNG); returns it."""
    plt = _pyplot()
    types = sorted(markers)  # the colours of the report's UMAP
    colours = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for shape, (name, (cells, labels)) in zip(GENERATOR_MARKERS, generated.items()):
        stats = marker_gene_statistics(real, real_labels, cells, labels, gene_names, markers, min_cells)
        colour = [colours(types.index(t) % colours.N) for t in stats["type"]]
        for ax, statistic in zip(axes, ("mean", "variance")):
            ax.scatter(stats[f"real_{statistic}"], stats[f"generated_{statistic}"], s=28, c=colour, marker=shape,
                       alpha=0.8, edgecolors="black" if shape == "o" else "none", linewidths=0.4, label=name)
            if shape == GENERATOR_MARKERS[0]:  # the first generator's points named by gene
                for x, y, gene in zip(stats[f"real_{statistic}"], stats[f"generated_{statistic}"], stats["gene"]):
                    ax.annotate(gene, (x, y), fontsize=5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    for ax, statistic in zip(axes, ("mean", "variance")):
        top = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel(f"real held-out cells: per-gene {statistic} (log1p)", fontsize=8)
        ax.set_ylabel(f"generated cells: per-gene {statistic} (log1p)", fontsize=8)
        ax.set_title(f"marker genes: {statistic}", fontsize=9)
        ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], linestyle="", marker="o", color=colours(k % colours.N), label=t)
               for k, t in enumerate(types)]
    handles += [plt.Line2D([], [], linestyle="", marker=shape, color="black", fillstyle="none", label=name)
                for shape, name in zip(GENERATOR_MARKERS, generated)]
    axes[1].legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Top 3 marker genes per type (training cells): generated vs real held-out cells", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


__all__ = ["first_last_losses", "loss_keys", "plot_losses", "marker_gene_statistics", "plot_marker_genes"]
