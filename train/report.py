"""The demo's report: `report.md` (model vs baselines), a confusion matrix, a UMAP of real and generated cells, and
example descriptions next to their references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .evaluate import (NB_BASELINE, PSEUDO_CELL_BASELINES, PSEUDO_CELLS_PER_TYPE, REAL_CELLS_REFERENCE, REAL_HELD_OUT,
                       results_table)
from .plots import plot_marker_genes
from .pseudo_cell_metrics import (METRICS, MIN_HELD_OUT_CELLS, SCORED_TYPES, marker_genes, mean_figure,
                                  pseudo_cell_goals)
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


def _embeddings(real: np.ndarray, generated: np.ndarray, seed: int) -> list[tuple[str, np.ndarray]]:
    """[(title, (real + generated cells, 2) coordinates)]: a PCA fitted on the real cells, the generated ones
    projected into it (linear: distances to the real cloud are kept), and a UMAP fitted on real and generated cells
    together (where generated cells differ from every real cell they form islands of their own; a UMAP fitted on the
    real cells alone would place them among their nearest real cells however far those are)."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(30, *real.shape), random_state=seed).fit(real)
    pcs = np.concatenate([pca.transform(real), pca.transform(generated)])
    embeddings = [("PCA of the real cells, generated cells projected", pcs[:, :2])]
    try:
        import umap
    except ImportError:
        return embeddings
    coords = umap.UMAP(random_state=seed, n_neighbors=15).fit_transform(pcs)
    return embeddings + [("UMAP of real and generated cells together", coords)]


def plot_cells_umap(real, real_labels, generated, generated_labels, path: Path, seed: int = 0) -> Path:
    """Real held-out cells (dots, coloured by type) and generated cells (crosses, their prompt's type's colour), in
    a PCA of the real cells and in a UMAP of both together (`_embeddings`): generated cells that look like draws
    from their type mix into that type's real cloud in both."""
    plt = _pyplot()
    embeddings = _embeddings(np.asarray(real), np.asarray(generated), seed)
    labels = sorted(set(real_labels) | set(generated_labels))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(embeddings), figsize=(6.5 * len(embeddings), 6), squeeze=False)
    real_labels, generated_labels, n_real = np.asarray(real_labels), np.asarray(generated_labels), len(real)
    for ax, (title, coords) in zip(axes[0], embeddings):
        for k, label in enumerate(labels):
            ax.scatter(*coords[n_real:][generated_labels == label].T, s=22, color=colours(k % colours.N), marker="x",
                       linewidths=0.9, alpha=0.6)
        for k, label in enumerate(labels):  # real cells drawn last, outlined: fewer than the generated ones
            ax.scatter(*coords[:n_real][real_labels == label].T, s=18, color=colours(k % colours.N),
                       edgecolors="black", linewidths=0.4, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle("Real held-out cells (dots) and scMMGPT pseudo-cells from text (crosses), coloured by cell type",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PSEUDO_CELL_TEXT = (
    "Pseudo-cells ({n} per cell type) from each type's label text, compared with the real held-out cells of their "
    "type (`scmmgpt_train.pseudo_cell_metrics`). *Classifier accuracy*: logistic regression on all genes fitted on "
    "training cells, applied to the generated cells; it asks only whether a cell is recognisable as its type, so the "
    "per-type mean scores 1.0: read it with the distribution figures. *Energy distance*: per type, in the PCA space "
    "of the training cells, unbiased (real draws score ~0, below 0 by chance), mean over the {scored} types with at "
    "least {min_cells} held-out cells{flagged}. *Correlations*: over genes, of each type's per-gene mean, variance "
    "and detection rate (share of cells > 0); the mean's, like the classifier, checks location only (the per-type "
    "mean tops real cells on it). *Diversity*: mean within-type pairwise distance (PCA space) relative to "
    "the real held-out cells', 1 for real spread, 0 for collapse. *Real training cells* (as many per type, at most "
    "half of a type's, left out of the PCA and classifier fits) mark the ideal at this sample size, the *per-type "
    "mean* collapse; the baselines are what a user writes without a model: the type's mean plus Gaussian noise, a "
    "negative binomial per gene fitted on the training counts, a Gaussian in PCA space. The *k-NN vote* (15 held-out "
    "neighbours, the paper's metric) rewards type centres: a type with few held-out cells never wins a vote."
)


def pseudo_cell_sections(rows: dict, output_dir: Path | None = None, test=None) -> list[str]:
    """Markdown lines of the pseudo-cell section: what the figures mean and issue 17's goal lines, from the rows of
    one run or of the seeds' summary ([mean, sd]). With the run's `test` cells, draws `umap.png` (real and
    generated cells) and `marker_genes.png` (marker genes' mean and variance, generated vs real) into `output_dir`."""
    model = rows.get("scMMGPT", {})
    labels = model.get("labels", ())
    n_per_type = len(labels) // len(set(labels)) if len(labels) else PSEUDO_CELLS_PER_TYPE
    flagged = model.get("types_too_few_cells")
    scored = mean_figure(model.get(SCORED_TYPES, float("nan")))
    text = PSEUDO_CELL_TEXT.format(
        n=n_per_type, scored=f"{scored:.0f}", min_cells=MIN_HELD_OUT_CELLS,
        flagged=f" (too few held-out cells: {', '.join(flagged)})" if flagged else "")
    lines = ["", "## Pseudo-cells", "", text]
    if "energy_distance" in model:
        goals = pseudo_cell_goals(rows, "scMMGPT", PSEUDO_CELL_BASELINES, REAL_HELD_OUT, REAL_CELLS_REFERENCE)
        lines += ["", "Goals (issue 17):", "", goal_lines(goals)]
    if test is not None and "expression" in model:
        output_dir = Path(output_dir)
        plot_cells_umap(test.matrix, test.labels, model["expression"], model["labels"], output_dir / "umap.png")
        markers = model.get("marker_genes") or marker_genes(test.matrix, test.labels, test.gene_names)
        shown = {name: (rows[name]["expression"], rows[name]["labels"]) for name in ("scMMGPT", NB_BASELINE)
                 if name in rows}
        plot_marker_genes(test.matrix, test.labels, shown, test.gene_names, markers, output_dir / "marker_genes.png",
                          min_cells=MIN_HELD_OUT_CELLS)
        lines += ["", "![real and generated cells](umap.png)", "",
                  "![marker genes' mean and variance, generated vs real](marker_genes.png)"]
    return lines


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
    if results.get("coarse_labels"):
        lines += [
            "", "## Coarser ontology labels", "",
            "`annotate` with Cell Ontology names coarser than the training types, on the held-out cells: each cell's "
            "type mapped up the ontology is the truth. By default a coarse label scores as the best of its own text "
            "and its trained subtypes' texts (`subtypes=True`); its own text alone is one the model never trained on. "
            "The model's own labels and logistic regression (fitted on the training types) are mapped up too.", "",
            shift_table(results["coarse_labels"], "labels"),
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
    """Writes report.md and its figures (confusion matrix, UMAP, marker genes) into `output_dir` (and `shifts.png`
    with the shift suite's results); returns the report's path. `steps`: the `training_steps` of the run, listed
    with a warning for stages cut short; `held_out`: {seed: types} of the unseen-type model, if `results` has its
    figures."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    best = max((name for name in results["annotation"] if name.startswith("scMMGPT")),
               key=lambda name: results["annotation"][name]["accuracy"])
    plot_confusion_matrix(test.labels, results["annotation"][best]["predictions"], labels,
                          output_dir / "confusion_matrix.png", f"{best} on held-out PBMC cells")
    described = results["description"]["scMMGPT"]["texts"]
    lines = [
        "# scMMGPT demo report",
        "",
        "The embedded default model (tiny-cpu), trained on the shipped PBMC cells (scanpy's 10x_pbmc68k_reduced) with "
        "Cell Ontology texts, scored on held-out cells against baselines on the same split.",
        "",
        results_table(results),
        "",
        f"![confusion matrix of {best}](confusion_matrix.png)",
        *pseudo_cell_sections(results["pseudo_cells"], output_dir, test),
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
    annotation accuracy and macro-F1 per method, description BLEU / ROUGE / METEOR, and the pseudo-cells' figures
    (`pseudo_cell_metrics.METRICS` and the k-NN vote; those a run has), all on `dataset`."""
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
            metric: float(generated[metric]) for metric in (*METRICS, "knn_accuracy") if metric in generated}},
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


__all__ = ["write_report", "pseudo_cell_sections", "PSEUDO_CELL_TEXT", "training_steps",
           "plot_shift_accuracy", "robustness_sections", "plot_confusion_matrix",
           "plot_cells_umap", "card_eval_results", "held_out_dataset", "write_model_card"]
