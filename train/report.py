"""The demo's report: `report.md` (model vs baselines), a confusion matrix, a UMAP of real and generated cells, and
example descriptions next to their references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .evaluate import results_table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(references, predictions, labels: list[str], path: Path, title: str) -> Path:
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    matrix = confusion_matrix(references, predictions, labels=labels, normalize="true")
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j] >= 0.01:
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted cell type")
    ax.set_ylabel("true cell type")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true type")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cells_umap(real, real_labels, generated, generated_labels, path: Path, seed: int = 0) -> Path:
    """UMAP (PCA fallback) of real held-out cells, coloured by type, with generated cells as crosses. The embedding is
    fitted on the real cells alone and the generated ones are placed into it (`transform`): fitted on both, tight
    generated clusters became islands of their own and hid where they fall among real cells."""
    from sklearn.decomposition import PCA

    plt = _pyplot()
    pca = PCA(n_components=min(30, *real.shape), random_state=seed).fit(real)
    real_pcs, generated_pcs = pca.transform(real), pca.transform(generated)
    try:
        import umap

        reducer = umap.UMAP(random_state=seed, n_neighbors=15).fit(real_pcs)
        coords, method = np.concatenate([reducer.embedding_, reducer.transform(generated_pcs)]), "UMAP"
    except ImportError:
        coords, method = np.concatenate([real_pcs, generated_pcs])[:, :2], "PCA"
    labels = sorted(set(real_labels) | set(generated_labels))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8, 6.5))
    n_real = len(real)
    for k, label in enumerate(labels):
        colour = colours(k % colours.N)
        real_mask, gen_mask = np.asarray(real_labels) == label, np.asarray(generated_labels) == label
        ax.scatter(*coords[:n_real][real_mask].T, s=14, color=colour, alpha=0.6, label=label)
        ax.scatter(*coords[n_real:][gen_mask].T, s=30, color=colour, marker="x", linewidths=1.2)
    ax.set_title(f"{method} of real held-out cells (dots); scMMGPT pseudo-cells from text placed in it (crosses)",
                 fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_steps(stages: dict) -> dict[str, tuple[int, int]]:
    """{stage: (optimiser steps run, steps planned)} from each stage's `trainer_state.json` (`run_pipeline`'s
    `stages`); a stage with fewer steps run than planned was stopped by its wall-time guard."""
    steps = {}
    for name, record in stages.items():
        path = Path(record.get("trainer_state") or "")
        if path.is_file():
            state = json.loads(path.read_text())
            steps[name] = (int(state.get("global_step", 0)), int(state.get("max_steps", 0)))
    return steps


def write_report(results: dict, test, output_dir: Path, labels: list[str], timings: dict | None = None,
                 n_examples: int = 6, steps: dict | None = None) -> Path:
    """Writes report.md and the two figures into `output_dir`; returns the report's path. `steps`: the
    `training_steps` of the run, listed with a warning for stages cut short."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    best = max((name for name in results["annotation"] if name.startswith("scMMGPT")),
               key=lambda name: results["annotation"][name]["accuracy"])
    plot_confusion_matrix(test.labels, results["annotation"][best]["predictions"], labels,
                          output_dir / "confusion_matrix.png", f"{best} on held-out PBMC cells")
    generated = results["pseudo_cells"]["scMMGPT"]
    plot_cells_umap(test.matrix, test.labels, generated["expression"], generated["labels"], output_dir / "umap.png")
    described = results["description"]["scMMGPT"]["texts"]
    lines = [
        "# scMMGPT demo report",
        "",
        "The embedded default model (tiny-cpu), trained on the shipped PBMC cells (scanpy's 10x_pbmc68k_reduced) with "
        "Cell Ontology texts, scored on held-out cells against baselines on the same split.",
        "",
        results_table(results),
        "",
        "Pseudo-cells are classified by a 15-neighbour k-NN fitted on the held-out cells: a type with only a few "
        "held-out cells can never win a vote, so even each type's exact mean expression (\"per-type mean, no "
        "noise\", a reference, not a generator) scores below 1; \"real training cells\" scatter into neighbouring "
        "types.",
        "",
        f"![confusion matrix of {best}](confusion_matrix.png)",
        "",
        "![real and generated cells](umap.png)",
        "",
        "## Example descriptions",
        "",
        "| true type | scMMGPT | reference |",
        "|---|---|---|",
    ]
    for i in range(min(n_examples, len(described))):
        lines.append(f"| {test.labels[i]} | {described[i][:200]} | {test.texts[i][:200]} |")
    if steps:
        lines += ["", "## Training steps", "", "| stage | steps run / planned |", "|---|---|"]
        lines += [f"| {stage} | {run} / {planned}{' (cut short by max_seconds)' if run < planned else ''} |"
                  for stage, (run, planned) in steps.items()]
    if timings:
        lines += ["", "## Time", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {step} | {seconds:.0f} |" for step, seconds in timings.items()]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ the model card
SHIPPED_PBMC = {"name": "PBMC 68k (reduced), scanpy", "type": "scanpy/pbmc68k_reduced"}
# evaluate's description metric → the card's
CARD_DESCRIPTION_METRICS = {"bleu2": "bleu_2", "bleu4": "bleu_4", "rouge1": "rouge_1", "rouge2": "rouge_2",
                            "rougeL": "rouge_l", "meteor": "meteor"}
MODEL_ROW = "scMMGPT"


def held_out_dataset(data) -> dict:
    """The card's dataset entry for the held-out split the report scores (`data`: the run's `DataArguments`)."""
    source = data.h5ad or data.dataset_dir
    dataset = dict(SHIPPED_PBMC) if source is None else {"name": Path(source).name, "type": Path(source).name}
    return {**dataset, "name": f"{dataset['name']}: held-out test split", "split": "test"}


def card_eval_results(results: dict, dataset: dict) -> dict:
    """The model's own rows of `evaluate_model`'s results (baselines left out) as a model card's `eval_results`:
    annotation accuracy and macro-F1 per method, description BLEU / ROUGE / METEOR, and the pseudo-cells' k-NN
    accuracy and mean correlation, all on `dataset`."""
    prefix = f"{MODEL_ROW} ("
    annotation = [{"method": name[len(prefix):-1], "dataset": dataset,
                   "metrics": {"accuracy": float(row["accuracy"]), "macro_f1": float(row["macro_f1"])}}
                  for name, row in results["annotation"].items() if name.startswith(prefix)]
    described, generated = results["description"][MODEL_ROW], results["pseudo_cells"][MODEL_ROW]
    return {
        "cell-annotation": annotation,
        "cell-description": {"dataset": dataset, "metrics": {
            card: float(described[key]) for key, card in CARD_DESCRIPTION_METRICS.items()}},
        "text-to-cell": {"dataset": dataset, "metrics": {
            "knn_accuracy": float(generated["knn_accuracy"]), "mean_correlation": float(generated["mean_correlation"])}},
    }


def write_model_card(model_dir, results: dict, config) -> Path:
    """Re-render the model card of `model_dir` with the report's held-out figures (`config`: the run's
    `PipelineConfig`); training wrote it without figures. Returns the card's path."""
    from modeling_scmmgpt.hub_cards import render_model_card

    from .stages import model_name

    data = config.data
    training_data = (
        f"Cells of {held_out_dataset(data)['name'].split(':')[0]} with texts built from the Cell Ontology definition "
        f"of their `{data.label_column}` cell type (`cell type: X. <CL definition>`). A {data.test_size:.0%} split "
        f"(by {data.split_by}, seed {data.seed}) is held out: no training stage sees it, and the evaluation below "
        "scores it, as the demo's `report.md` does. Stage 1 aligns cells and text (contrastive, matching and "
        "captioning losses); stage 2 tunes the language model on descriptions and on text → cell generation."
    )
    render_model_card(model_dir, card_eval_results(results, held_out_dataset(data)),
                      model_name=model_name(config.path), training_data=training_data)
    return Path(model_dir) / "README.md"


__all__ = ["write_report", "training_steps", "plot_confusion_matrix", "plot_cells_umap", "card_eval_results",
           "held_out_dataset", "write_model_card"]
