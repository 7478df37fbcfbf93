"""The demo's report: `report.md` (model vs baselines), a confusion matrix, a UMAP of real and generated cells, and
example descriptions next to their references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .evaluate import results_table
from .robustness import goal_lines, shift_goals, shift_table, unseen_goals, unseen_table
from .shifts import FULL_SUITE


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


# shift families whose strength is a number: (x-axis label, the clean cells' strength)
SHIFT_AXES = {"depth": ("fraction of reads kept", 1.0), "gene panel": ("fraction of genes kept", 1.0),
              "batch effect": ("σ of the log gene factors", 0.0)}


def plot_shift_accuracy(shifts: dict, path: Path, title: str = "") -> Path:
    """Accuracy against shift strength: a panel per shift family in `shifts` (`evaluate_shifts`' rows, or their
    [mean, sd] over seeds, drawn as error bars), a line per method, each starting from the clean cells."""
    plt = _pyplot()
    suite = {shift.name: shift for shift in FULL_SUITE}
    families = list(dict.fromkeys(suite[name].family for name in shifts if name in suite and name != "clean"))
    methods = list(dict.fromkeys(key.rsplit(": ", 1)[0] for row in shifts.values() for key in row
                                 if key.endswith(": accuracy")))
    columns = min(3, max(1, len(families)))
    rows = -(-(len(families) + 1) // columns)  # one more panel for the legend
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, family in zip(axes, families):
        names = ["clean", *(name for name in shifts if name in suite and suite[name].family == family)]
        label, clean_x = SHIFT_AXES.get(family, ("", None))
        x = ([clean_x, *(suite[n].strength for n in names[1:])] if clean_x is not None else list(range(len(names))))
        for method in methods:
            values = [shifts[n].get(f"{method}: accuracy") for n in names]
            means = [np.nan if v is None else (v[0] if isinstance(v, (list, tuple)) else v) for v in values]
            sds = [0.0 if not isinstance(v, (list, tuple)) else v[1] for v in values]
            ax.errorbar(x, means, yerr=sds, marker="o", markersize=3, linewidth=1.2, capsize=2, label=method)
        if clean_x is None:
            ax.set_xticks(x, names, rotation=20, ha="right", fontsize=7)
        elif family != "batch effect":
            ax.invert_xaxis()  # stronger shifts to the right, as for σ
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("accuracy on held-out cells", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(family, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(families):]:
        ax.axis("off")
    axes[len(families)].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def robustness_sections(results: dict, output_dir: Path, held_out: dict | None = None) -> list[str]:
    """Markdown lines of the shift-suite and unseen-type sections of a report (one run's `results`) or of the
    seeds' summary (`[mean, sd]` figures); draws `shifts.png` into `output_dir`. `held_out`: {seed: held-out
    types} of the unseen-type models."""
    lines = []
    if results.get("shifts"):
        plot_shift_accuracy(results["shifts"], Path(output_dir) / "shifts.png", "annotation under dataset shift")
        lines += [
            "", "## Under dataset shift", "",
            "The held-out cells' counts (rebuilt from the stored log1p values and each cell's library size; "
            "`scmmgpt_train.shifts`), shifted (seeded by the run's seed) and handed to the jobs as a user's matrix "
            "(counts or log1p values with gene names, the value kind detected); each cell's reads on genes outside "
            "the vocabulary come as one more column, as in a user's full matrix, so that clean counts normalise to "
            "the values the model trained on. The baselines are fitted on the clean training cells and read the "
            "shifted matrix as log1p(CP10k) over the genes present, absent genes 0.", "",
            shift_table(results["shifts"]), "", "Goals (issue 16):", "", goal_lines(shift_goals(results["shifts"])),
            "", "![annotation accuracy under dataset shift](shifts.png)",
        ]
    if results.get("unseen"):
        types = "; ".join(f"seed {seed}: {', '.join(t)}" for seed, t in (held_out or {}).items())
        lines += [
            "", "## Unseen cell types", "",
            f"A second model trained without the cells of three types ({types}); retrieval and likelihood rank all "
            "label texts, seen in training or not. Seen-type cells are compared with the model trained on every "
            "type, on its own test cells of the same types; logistic regression cannot name a type it never saw.",
            "", unseen_table(results["unseen"]), "", "Goals (issue 16):", "",
            goal_lines(unseen_goals(results["unseen"])),
        ]
    return lines


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
                 n_examples: int = 6, steps: dict | None = None, held_out: dict | None = None) -> Path:
    """Writes report.md and the two figures into `output_dir` (and `shifts.png` with the shift suite's results);
    returns the report's path. `steps`: the `training_steps` of the run, listed with a warning for stages cut short;
    `held_out`: {seed: types} of the unseen-type model, if `results` has its figures."""
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
    lines += robustness_sections(results, output_dir, held_out)
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


__all__ = ["write_report", "training_steps", "plot_shift_accuracy", "robustness_sections", "plot_confusion_matrix",
           "plot_cells_umap", "card_eval_results", "held_out_dataset", "write_model_card"]
