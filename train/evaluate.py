"""Evaluation of the three jobs against baselines on the same split.

- cell type annotation: accuracy and macro-F1 for each `annotate` method; baselines: majority class, logistic
  regression and k-NN on PCA of log1p expression;
- cell description: BLEU-2/4, ROUGE-1/2/L, METEOR; baseline: the text of the nearest training cell (PCA space);
- text-conditioned pseudo-cells (`evaluate_pseudo_cells`, metrics in `pseudo_cell_metrics`): generated cells against
  the real held-out cells of their type: a classifier's accuracy, energy distance in PCA space, per-gene mean /
  variance / detection-rate correlations, diversity, and the k-NN vote of the paper (which rewards type centres);
  references: real training cells (the ideal) and the per-type mean (collapse); baselines: per-type mean + noise,
  per-type negative binomial, per-type Gaussian in PCA space.

Metrics go through `evaluate` with the local modules in `train/metrics/` (they load offline).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from modeling_scmmgpt.jobs_scmmgpt import ScMMGPTJobs

from .pseudo_cell_metrics import (METRICS, SCORED_TYPES, marker_genes, negative_binomial_cells,
                                  pca_gaussian_cells, reference_rows, score_pseudo_cells, types_won, won_key)
from .streaming import log_normalized, rows_to_matrix

METRICS_DIR = Path(__file__).parent / "metrics"
ANNOTATION_METHODS = ("retrieval", "likelihood", "generate")
REAL_CELLS_REFERENCE = "real training cells"
TYPE_MEAN_REFERENCE = "per-type mean, no noise"
REAL_HELD_OUT = "real held-out cells (classifier yardstick)"
NOISY_MEAN_BASELINE, NB_BASELINE, GAUSSIAN_BASELINE = ("per-type mean + noise", "per-type negative binomial",
                                                       "per-type Gaussian (PCA)")
PSEUDO_CELL_BASELINES = (NOISY_MEAN_BASELINE, NB_BASELINE, GAUSSIAN_BASELINE)
FIDELITY_CLASSIFIER = "logistic regression (all genes)"
ONE_STATE_PER_TEXT = "scMMGPT, one state per text (no state spread)"
PSEUDO_CELLS_PER_TYPE = 50  # enough draws for a type's per-gene variance and detection rate to be compared


@lru_cache(maxsize=None)
def load_metric(name: str):
    """A local `evaluate` metric module by name (`cell_annotation`, `cell_description`)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def annotation_scores(references, predictions) -> dict:
    return load_metric("cell_annotation").compute(predictions=list(predictions), references=list(references))


def description_scores(references, predictions) -> dict:
    return load_metric("cell_description").compute(predictions=list(predictions), references=list(references))


# ------------------------------------------------------------------------------------------------ data
@dataclass
class EvalCells:
    """Cells of one split as a log1p-normalised matrix over the model's genes, with labels and texts."""

    matrix: "np.ndarray"  # (cells, genes) dense log1p expression, columns in `gene_names` order
    labels: np.ndarray
    texts: list[str]
    gene_names: list[str]

    @classmethod
    def from_rows(cls, rows, cell_tokenizer) -> "EvalCells":
        rows = [rows[i] for i in range(len(rows))]
        genes = list(cell_tokenizer.gene_names)
        matrix = log_normalized(rows, rows_to_matrix(rows, len(genes)), cell_tokenizer.target_sum)
        return cls(matrix=np.asarray(matrix.todense(), dtype=np.float32),
                   labels=np.asarray([r["cell_type"] for r in rows]), texts=[r["text"] for r in rows], gene_names=genes)


def fit_pca(train: EvalCells, n_components: int = 50, seed: int = 0):
    from sklearn.decomposition import PCA

    return PCA(n_components=min(n_components, *train.matrix.shape), random_state=seed).fit(train.matrix)


# ------------------------------------------------------------------------------------------------ baselines
def fit_annotation_baselines(train: EvalCells, pca, k: int = 15, names=None) -> dict:
    """The annotation baselines fitted on the training cells: name → a classifier of (cells, genes) log1p matrices in
    `train.gene_names` order (`predict`, `predict_proba`, `classes_`): the majority class, logistic regression on
    all genes and on PCA, and k-NN on PCA (only those in `names`, if given). Fitted once, they can score any number
    of test matrices."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline

    def on_pcs(classifier):  # the PCA is fitted already: a pipeline of fitted steps predicts without refitting
        return Pipeline([("pca", pca), ("classifier", classifier.fit(pca.transform(train.matrix), train.labels))])

    fits = {
        "majority class": lambda: DummyClassifier(strategy="most_frequent").fit(train.matrix, train.labels),
        "logistic regression (all genes)": lambda: LogisticRegression(max_iter=2000).fit(train.matrix, train.labels),
        "logistic regression (PCA)": lambda: on_pcs(LogisticRegression(max_iter=2000)),
        f"k-NN, k={k} (PCA)": lambda: on_pcs(KNeighborsClassifier(n_neighbors=k)),
    }
    return {name: fit() for name, fit in fits.items() if names is None or name in names}


def annotation_baselines(train: EvalCells, test: EvalCells, pca, k: int = 15) -> dict[str, np.ndarray]:
    """Predicted labels of the test cells by the majority class, logistic regression and k-NN on PCA."""
    return {name: model.predict(test.matrix) for name, model in fit_annotation_baselines(train, pca, k).items()}


def nearest_cell_descriptions(train: EvalCells, test: EvalCells, pca) -> list[str]:
    """Baseline description: the text of each test cell's nearest training cell in PCA space."""
    from sklearn.neighbors import NearestNeighbors

    nearest = NearestNeighbors(n_neighbors=1).fit(pca.transform(train.matrix))
    index = nearest.kneighbors(pca.transform(test.matrix), return_distance=False)[:, 0]
    return [train.texts[i] for i in index]


def noisy_mean_cells(train: EvalCells, types: list[str], n_per_type: int, noise: float = 1.0,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Baseline pseudo-cells: each type's mean training expression plus Gaussian noise of `noise` × the type's
    per-gene standard deviation, clipped at 0."""
    rng = np.random.default_rng(seed)
    cells, labels = [], []
    for cell_type in types:
        group = train.matrix[train.labels == cell_type]
        draws = group.mean(0) + noise * group.std(0) * rng.standard_normal((n_per_type, group.shape[1]))
        cells.append(np.clip(draws, 0, None))
        labels += [cell_type] * n_per_type
    return np.concatenate(cells).astype(np.float32), np.asarray(labels)


def real_cell_draws(train: EvalCells, types: list[str], n_per_type: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A reference for the pseudo-cell scores: `n_per_type` real training cells of each type (all of a type with
    fewer), scored as if generated. Far below 1 on a small held-out set: a type with fewer held-out cells than half
    of k can never win a k-NN vote, and single cells scatter into neighbouring types, so a generator of type-typical
    (centroid-like) cells can score above real cells. `evaluate_pseudo_cells` draws its reference with
    `pseudo_cell_metrics.reference_rows` instead (at most half of a type, kept out of the scoring fits)."""
    rng = np.random.default_rng(seed)
    cells, labels = [], []
    for cell_type in types:
        rows = np.flatnonzero(train.labels == cell_type)
        picked = rng.choice(rows, size=min(n_per_type, rows.size), replace=False)
        cells.append(train.matrix[picked])
        labels += [cell_type] * picked.size
    return np.concatenate(cells), np.asarray(labels)


def pseudo_cell_scores(real: EvalCells, generated: np.ndarray, generated_labels, pca, k: int = 15) -> dict:
    """k-NN accuracy of generated cells (k-NN fitted on real cells in the fixed PCA embedding) and the mean
    Pearson correlation of generated and real per-type mean expression."""
    from sklearn.neighbors import KNeighborsClassifier

    generated_labels = np.asarray(generated_labels)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(real.labels))).fit(pca.transform(real.matrix), real.labels)
    predicted = knn.predict(pca.transform(generated))
    knn_accuracy = annotation_scores(generated_labels, predicted)["accuracy"]
    correlations = []
    for cell_type in np.unique(generated_labels):
        if (real.labels == cell_type).any():
            a, b = generated[generated_labels == cell_type].mean(0), real.matrix[real.labels == cell_type].mean(0)
            correlations.append(float(np.corrcoef(a, b)[0, 1]))
    return {"knn_accuracy": knn_accuracy, "mean_correlation": float(np.mean(correlations)), "predicted": predicted}


def generate_pseudo_cells(jobs, texts: list[str], n_per_text: int, seed: int = 0, **options) -> np.ndarray:
    """(texts · n_per_text, genes) log1p pseudo-cells of `jobs.generate_cells` (`options` passed on): a
    count-distribution decoder's draws asked for as log1p values by name (never counts, whatever the jobs' default);
    a decoder of log1p values (the paper's MSE decoding, or jobs without an `output`) gives its values as they are."""
    samples = getattr(jobs, "expression_distribution", "mse") != "mse"
    takes_output = "output" in inspect.signature(jobs.generate_cells).parameters
    options = {"output": "log1p", **options} if samples and takes_output else options
    return jobs.generate_cells(texts, n_per_text=n_per_text, seed=seed, **options).expression


def evaluate_pseudo_cells(train: EvalCells, test: EvalCells, types: list[str], generated: dict, pca,
                          n_per_type: int = PSEUDO_CELLS_PER_TYPE, seed: int = 0, k: int = 15) -> dict:
    """Generated cells and the reference rows scored against the real held-out cells (`pseudo_cell_metrics`).

    `generated`: {name: ((cells, genes) log1p values, labels)}, e.g. the model's; `pca`: fitted on all training
    cells (the Gaussian baseline's space). Reference rows: real training cells (`reference_rows`: kept out of the
    scoring PCA and classifier, which are fitted on the other training cells), the per-type mean, and the
    baselines: per-type mean + noise, negative binomial and PCA Gaussian (`n_per_type` cells each). Each row holds
    `score_pseudo_cells`' figures, `knn_accuracy` (a k-NN vote of held-out cells), `expression` and `labels`; each
    generated row adds the count of types where it is below each baseline on energy distance (`won_key`),
    `SCORED_TYPES` and `marker_genes` (each type's top 3 in the training cells, for the report's figure). The row
    `REAL_HELD_OUT` holds the classifier's accuracy on the held-out cells; the real-cell reference is its
    per-type-balanced counterpart (cells drawn per type, as generated ones are)."""
    reference = reference_rows(train.labels, types, n_per_type, seed)
    outside = np.setdiff1d(np.arange(len(train.labels)), reference)
    fit = EvalCells(train.matrix[outside], train.labels[outside], [train.texts[i] for i in outside], train.gene_names)
    scoring_pca = fit_pca(fit, seed=seed)
    classifier = fit_annotation_baselines(fit, scoring_pca, names=[FIDELITY_CLASSIFIER])[FIDELITY_CLASSIFIER]
    rows = {
        **generated,
        REAL_CELLS_REFERENCE: (train.matrix[reference], train.labels[reference]),
        # a type's centre: the collapse every distribution figure must punish
        TYPE_MEAN_REFERENCE: noisy_mean_cells(train, types, 1, noise=0.0),
        NOISY_MEAN_BASELINE: noisy_mean_cells(train, types, n_per_type, seed=seed),
        NB_BASELINE: negative_binomial_cells(train, types, n_per_type, seed=seed),
        GAUSSIAN_BASELINE: pca_gaussian_cells(train, types, n_per_type, pca, seed=seed),
    }
    results = {}
    for name, (cells, labels) in rows.items():
        knn = pseudo_cell_scores(test, cells, labels, scoring_pca, k)["knn_accuracy"]
        results[name] = {**score_pseudo_cells(test.matrix, test.labels, cells, labels, scoring_pca, classifier),
                         "knn_accuracy": knn, "expression": cells, "labels": np.asarray(labels)}
    markers = marker_genes(train.matrix, train.labels, train.gene_names)  # the figure's genes, from training cells
    for name in generated:
        results[name]["marker_genes"] = markers
        for baseline in PSEUDO_CELL_BASELINES:
            won, scored = types_won(results[name], results[baseline])
            results[name][won_key(baseline)], results[name][SCORED_TYPES] = float(won), float(scored)
    results[REAL_HELD_OUT] = {"classifier_accuracy": float(np.mean(classifier.predict(test.matrix) == test.labels))}
    return results


# ------------------------------------------------------------------------------------------------ the model
def _annotation_row(test: EvalCells, predicted) -> dict:
    return {**annotation_scores(test.labels, predicted), "predictions": np.asarray(predicted)}


def evaluate_model(model, processor, train: EvalCells, test: EvalCells, label_texts: dict[str, str], *,
                   methods=ANNOTATION_METHODS, n_per_type: int = PSEUDO_CELLS_PER_TYPE, describe_cells: int | None = None, seed: int = 0,
                   progress: bool = True, classifier=None) -> dict:
    """Scores of the model and the baselines on the test cells; `classifier`, a fine-tuned
    `ScMMGPTCellForClassification`, adds the row "scMMGPT (fine-tuned)". Returns
    {"annotation": {name: {accuracy, macro_f1, predictions}}, "description": {name: scores + texts},
     "pseudo_cells": `evaluate_pseudo_cells`' rows}; `n_per_type` pseudo-cells are generated per cell type."""
    pca = fit_pca(train, seed=seed)
    labels = list(label_texts)
    jobs = ScMMGPTJobs(model, processor, label_texts, progress=progress, verbose=False)
    cells = jobs.read(test.matrix, test.gene_names, normalize=False)
    results = {"annotation": {}, "description": {}, "pseudo_cells": {}}
    # the jobs score the ontology names the LLM learned ("CD14-positive monocyte"), not the dataset's labels
    for method in methods:
        predicted = jobs.annotate(cells, labels, method=method).predictions
        results["annotation"][f"scMMGPT ({method})"] = _annotation_row(test, predicted)
    if classifier is not None:
        fine_tuned = ScMMGPTJobs(classifier, processor.feature_extractor, progress=progress, verbose=False)
        results["annotation"]["scMMGPT (fine-tuned)"] = _annotation_row(test, fine_tuned.annotate(cells).predictions)
    for name, predicted in annotation_baselines(train, test, pca).items():
        results["annotation"][name] = _annotation_row(test, predicted)

    n = len(test.labels) if describe_cells is None else min(describe_cells, len(test.labels))
    references = test.texts[:n]
    generated_texts = jobs.describe(jobs.read(test.matrix[:n], test.gene_names, normalize=False))
    results["description"]["scMMGPT"] = {**description_scores(references, generated_texts), "texts": generated_texts}
    nearest = nearest_cell_descriptions(train, test, pca)[:n]
    results["description"]["nearest training cell"] = {**description_scores(references, nearest), "texts": nearest}

    texts, cell_labels = [label_texts[t] for t in labels], np.repeat(labels, n_per_type)
    model_cells = {"scMMGPT": (generate_pseudo_cells(jobs, texts, n_per_type, seed), cell_labels)}
    spread = getattr(model, "cell_state_spread", None)
    if jobs.expression_distribution != "mse" and spread is not None and spread.fitted:  # what the spread adds
        model_cells[ONE_STATE_PER_TEXT] = (generate_pseudo_cells(jobs, texts, n_per_type, seed, state_spread=0.0),
                                           cell_labels)
    results["pseudo_cells"] = evaluate_pseudo_cells(train, test, labels, model_cells, pca, n_per_type, seed)
    return results


def results_table(results: dict) -> str:
    """The model-vs-baselines table (Markdown)."""
    lines = ["| job | method | metric | value |", "|---|---|---|---|"]
    for name, row in results["annotation"].items():
        lines.append(f"| annotation | {name} | accuracy / macro-F1 | {row['accuracy']:.3f} / {row['macro_f1']:.3f} |")
    for name, row in results["description"].items():
        scores = " / ".join(f"{row[k]:.3f}" for k in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"))
        lines.append(f"| description | {name} | BLEU-2 / BLEU-4 / ROUGE-1 / ROUGE-2 / ROUGE-L / METEOR | {scores} |")
    return "\n".join(lines) + "\n\n" + pseudo_cell_table(results["pseudo_cells"])


def _figure(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "—"


def pseudo_cell_table(rows: dict) -> str:
    """Markdown: a row per generator or reference, a column per pseudo-cell figure (`evaluate_pseudo_cells`' rows)."""
    components = next((row["pca_components"] for row in rows.values() if "pca_components" in row), "")
    lines = [f"| pseudo-cells vs real held-out cells | classifier accuracy | energy distance (PCA {components}) | "
             "mean / variance / detection-rate correlation | diversity | k-NN vote (rewards type centres) |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        correlations = " / ".join(_figure(row, key) for key in METRICS[2:5])
        lines.append(f"| {name} | {_figure(row, 'classifier_accuracy')} | {_figure(row, 'energy_distance')} | "
                     f"{correlations} | {_figure(row, 'diversity')} | {_figure(row, 'knn_accuracy')} |")
    return "\n".join(lines)


__all__ = ["EvalCells", "evaluate_model", "results_table", "annotation_scores", "description_scores",
           "annotation_baselines", "fit_annotation_baselines", "nearest_cell_descriptions", "noisy_mean_cells",
           "real_cell_draws", "pseudo_cell_scores", "fit_pca", "REAL_CELLS_REFERENCE", "TYPE_MEAN_REFERENCE",
           "load_metric", "ANNOTATION_METHODS", "generate_pseudo_cells", "evaluate_pseudo_cells", "pseudo_cell_table",
           "REAL_HELD_OUT", "NOISY_MEAN_BASELINE", "NB_BASELINE", "GAUSSIAN_BASELINE", "PSEUDO_CELL_BASELINES",
           "FIDELITY_CLASSIFIER", "PSEUDO_CELLS_PER_TYPE"]
