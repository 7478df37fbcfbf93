"""Pseudo-cell metric (local `evaluate` module, loads offline): generated cells judged as draws from their cell type,
against real held-out cells (`scmmgpt_train.pseudo_cell_metrics`, issue 17)."""

import datasets
import evaluate
import numpy as np

from scmmgpt_train.evaluate import FIDELITY_CLASSIFIER, EvalCells, fit_annotation_baselines, fit_pca
from scmmgpt_train.pseudo_cell_metrics import MIN_HELD_OUT_CELLS, score_pseudo_cells

_DESCRIPTION = """Classifier accuracy (logistic regression on all genes, fitted on real training cells), energy
distance and diversity in the PCA space fitted on the real training cells, and per-gene mean / variance /
detection-rate correlations, each per type against the real held-out cells and averaged over the types with at least
`min_cells` of them."""
_INPUTS = """
predictions: generated cells, each a list of log1p(CP10k) values over the genes (all of one length).
references: each generated cell's prompted cell type (str).
real_cells (keyword): (cells, genes) real held-out cells; real_labels: their types.
train_cells (keyword): (cells, genes) real training cells the PCA and the classifier are fitted on; train_labels.
n_components (default 50), min_cells (default 5), seed (default 0).
Returns {"classifier_accuracy", "energy_distance", "mean_correlation", "variance_correlation",
"detection_correlation", "diversity"} (floats), "per_type", "energy_distance_per_type", "types_too_few_cells",
"pca_components".
"""


class PseudoCells(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, real_cells, real_labels, train_cells, train_labels,
                 n_components=50, min_cells=MIN_HELD_OUT_CELLS, seed=0):
        train_cells = np.asarray(train_cells, dtype=np.float32)
        fit = EvalCells(train_cells, np.asarray(train_labels), [], [])
        pca = fit_pca(fit, n_components=n_components, seed=seed)
        classifier = fit_annotation_baselines(fit, pca, names=[FIDELITY_CLASSIFIER])[FIDELITY_CLASSIFIER]
        generated = np.asarray(predictions, dtype=np.float32)
        return score_pseudo_cells(np.asarray(real_cells, dtype=np.float32), np.asarray(real_labels), generated,
                                  np.asarray(references).astype(str), pca, classifier, min_cells=min_cells)
