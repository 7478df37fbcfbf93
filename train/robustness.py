"""Annotation off the training split: under dataset shift, on cell types no training stage saw, and with labels
coarser than the training types.

- `evaluate_shifts`: every shift of a suite (`shifts.SHORT_SUITE` / `FULL_SUITE`) applied to the held-out cells'
  counts and handed to the jobs as a user would (matrix + gene names, value kind detected); accuracy and macro-F1 of
  each annotation method and of two baselines fitted on the clean training cells (logistic regression on all genes,
  k-NN on PCA), which see the shifted matrix as a practitioner would prepare it (`baseline_matrix`); optionally the
  share of generated descriptions that name the right cell type;
- `evaluate_unseen_types`: top-1 / top-3 accuracy over all label texts from `CellAnnotation.scores`, with
  `reference_top_k` (logistic regression, which cannot predict a type it never saw, and chance);
- `evaluate_coarse_labels`: Cell Ontology labels coarser than the training types ("T cell"), with and without the
  trained subtypes' texts (`annotate(subtypes=)`), against each cell's type mapped up the ontology;
- the tables and the goal lines of the report and of `make eval`'s summary (issue 16), which read either one run's
  figures or `[mean, sd]` over seeds.

Results are `{row: {"<method>: <metric>": value}}`, scalars only, so `demo.summarize_seeds` averages them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modeling_scmmgpt.inputs_scmmgpt import value_kind
from modeling_scmmgpt.jobs_scmmgpt import ScMMGPTJobs, ontology_name
from modeling_scmmgpt.ontology_scmmgpt import cell_type_terms, trained_subtypes

from .evaluate import EvalCells, annotation_scores, fit_annotation_baselines, fit_pca
from .shifts import (SHORT_SUITE, Shift, apply_shift, counts_from_log1p, normalized_log1p,
                     smallest_count_library_sizes)
from .sources import COUNTS
from .streaming import rows_to_matrix

SHIFT_BASELINES = ("logistic regression (all genes)", "k-NN, k=15 (PCA)")
DESCRIPTIONS = "descriptions naming the type"
LIBRARY_SIZE_COLUMNS = ("n_counts", "total_counts", "nCount_RNA")  # obs columns of a cell's total count
RETRIEVAL, LOGISTIC = "scMMGPT (retrieval)", "logistic regression (all genes)"
MARKER_SCORE = "reference: marker-gene score (no training)"
UNSEEN, SEEN, SEEN_ALL_TYPES = "held-out-type cells", "seen-type test cells", "seen-type test cells, all-types model"
GOAL_SHIFTS = ("depth 50%", "genes 70%", "batch σ 0.3")
# PBMC's ten types at two coarser levels of the Cell Ontology: every trained type lies under one label of each set
COARSE_LABEL_SETS = {
    "lineages": ("B cell", "T cell", "natural killer cell", "monocyte", "dendritic cell",
                 "hematopoietic precursor cell"),
    "CD4 / CD8 T cells": ("B cell", "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell",
                          "natural killer cell", "monocyte", "dendritic cell", "hematopoietic precursor cell"),
}
WITH_SUBTYPES, TEXT_ONLY = "scMMGPT (retrieval, with trained subtypes)", "scMMGPT (retrieval, label texts only)"


# ---------------------------------------------------------------------------------------------------- cells
@dataclass
class CountCells:
    """Held-out cells as counts: `counts` (cells, genes) integer-valued, columns in `gene_names` order (the model's
    vocabulary); `library_sizes` (cells,) each cell's total over all of its source's genes."""

    counts: np.ndarray
    library_sizes: np.ndarray
    labels: np.ndarray
    texts: list[str]
    gene_names: list[str]

    @property
    def other_reads(self) -> np.ndarray:
        """(cells,) each cell's reads on its source's genes outside `gene_names`."""
        return np.clip(self.library_sizes - self.counts.sum(1), 0, None)

    @classmethod
    def from_rows(cls, rows, cell_tokenizer, library_sizes: dict | None = None) -> "CountCells":
        """Built rows → counts: count rows as stored (their `total_counts` the library size); log-normalised rows
        rebuilt with the cell's library size from `library_sizes` (cell id → total, `source_library_sizes`), else
        the smallest-value-is-one-count estimate (see `shifts`)."""
        rows = [rows[i] for i in range(len(rows))]
        genes = list(cell_tokenizer.gene_names)
        stored = np.asarray(rows_to_matrix(rows, len(genes)).todense(), dtype=np.float64)
        is_counts = np.array([r.get("value_kind", COUNTS) == COUNTS for r in rows], dtype=bool)
        sizes = np.array([r["total_counts"] if c else (library_sizes or {}).get(r["cell_id"], np.nan)
                          for r, c in zip(rows, is_counts)], dtype=np.float64)
        unknown = np.isnan(sizes)
        sizes[unknown] = smallest_count_library_sizes(stored[unknown], cell_tokenizer.target_sum)
        counts = stored.copy()
        counts[~is_counts] = counts_from_log1p(stored[~is_counts], sizes[~is_counts], cell_tokenizer.target_sum)
        return cls(counts=counts, library_sizes=sizes, labels=np.asarray([r["cell_type"] for r in rows]),
                   texts=[r["text"] for r in rows], gene_names=genes)


def source_library_sizes(path) -> dict[str, float] | None:
    """{cell id: total count} from an `.h5ad`'s obs (`n_counts`, `total_counts` or `nCount_RNA`), or None."""
    import warnings

    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old-format notices of the shipped PBMC file
        adata = anndata.read_h5ad(path, backed="r")
    try:
        column = next((c for c in LIBRARY_SIZE_COLUMNS if c in adata.obs), None)
        return None if column is None else dict(zip(adata.obs_names.astype(str), adata.obs[column].astype(float)))
    finally:
        adata.file.close()


def baseline_matrix(matrix: np.ndarray, gene_names: list[str], model_genes: list[str],
                    target_sum: float = 1e4) -> np.ndarray:
    """A handed matrix as a practitioner prepares it for a classifier trained on log1p(CP10k): counts (the kind
    detected as the jobs detect it) normalised over the genes present + log1p, log1p values as they are; columns in
    `model_genes` order, genes absent from the matrix 0. (cells, len(model_genes)) float32."""
    values = np.asarray(matrix, dtype=np.float64)
    if value_kind(values) in ("counts", "normalized"):
        values = normalized_log1p(values, target_sum)
    column = {gene: j for j, gene in enumerate(model_genes)}
    present = [(i, column[g]) for i, g in enumerate(gene_names) if g in column]
    out = np.zeros((len(values), len(model_genes)), dtype=np.float32)
    out[:, [j for _, j in present]] = values[:, [i for i, _ in present]]
    return out


# ---------------------------------------------------------------------------------------------------- shifts
def named_type_share(descriptions: list[str], labels, label_texts: dict[str, str]) -> float:
    """Share of descriptions whose leading cell-type name is the ontology name of the cell's true label."""
    names = {label: ontology_name(text).lower() for label, text in label_texts.items()}
    named = [ontology_name(text).lower() == names.get(label) for text, label in zip(descriptions, labels)]
    return float(np.mean(named))


def _scores_row(references, predictions: dict) -> dict[str, float]:
    row = {}
    for name, predicted in predictions.items():
        # a cell with no known gene expressed gets no label: counted as wrong
        scores = annotation_scores(references, ["" if p is None else p for p in predicted])
        row[f"{name}: accuracy"], row[f"{name}: macro_f1"] = float(scores["accuracy"]), float(scores["macro_f1"])
    return row


def evaluate_shifts(model, processor, train: EvalCells, test: CountCells, label_texts: dict[str, str], *,
                    suite: tuple[Shift, ...] = SHORT_SUITE, methods=("retrieval",), classifier=None,
                    describe: bool = False, seed: int = 0, progress: bool = False) -> dict[str, dict[str, float]]:
    """Annotation of the test cells under each shift of `suite`, against the baselines fitted on `train`.

    `methods`: the stage-2 model's annotation methods; `classifier` (a fine-tuned `ScMMGPTCellForClassification`)
    adds "scMMGPT (fine-tuned)"; `describe` adds the share of descriptions naming the right type. Returns
    {shift name: {"<method>: accuracy" / "<method>: macro_f1" / "descriptions naming the type: share": value}}."""
    labels = list(label_texts)
    jobs = ScMMGPTJobs(model, processor, label_texts, progress=progress, verbose=False)
    fine_tuned = None if classifier is None else ScMMGPTJobs(classifier, processor.feature_extractor,
                                                             progress=progress, verbose=False)
    fitted = fit_annotation_baselines(train, fit_pca(train, seed=seed), names=SHIFT_BASELINES)
    results = {}
    for shift in suite:
        matrix, genes = apply_shift(test.counts, test.gene_names, shift, test.other_reads, seed=seed)
        cells = jobs.read(matrix, genes)  # the value kind detected, as for a user's matrix
        predicted = {f"scMMGPT ({m})": jobs.annotate(cells, labels, method=m).predictions for m in methods}
        if fine_tuned is not None:
            predicted["scMMGPT (fine-tuned)"] = fine_tuned.annotate(cells).predictions
        features = baseline_matrix(matrix, genes, train.gene_names)
        predicted.update({name: fitted[name].predict(features) for name in SHIFT_BASELINES})
        results[shift.name] = _scores_row(test.labels, predicted)
        if describe:
            results[shift.name][f"{DESCRIPTIONS}: share"] = named_type_share(jobs.describe(cells), test.labels,
                                                                            label_texts)
    return results


# ---------------------------------------------------------------------------------------------------- unseen types
def top_k_accuracy(scores: np.ndarray, labels: list[str], references, k: int) -> float:
    """Share of cells whose true label is among the `k` best-scored `labels`; `scores` (cells, labels). A cell with
    no answer (a NaN row) or a true label outside `labels` is a miss."""
    scores = np.asarray(scores, dtype=np.float64)
    answered = ~np.isnan(scores).all(1)
    best = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :k]
    index = {label: j for j, label in enumerate(labels)}
    truth = np.array([index.get(r, -1) for r in references])
    return float(np.mean((best == truth[:, None]).any(1) & answered))


def evaluate_unseen_types(model, processor, cells: EvalCells, label_texts: dict[str, str], *,
                          methods=("retrieval", "likelihood"), ks=(1, 3), progress: bool = False) -> dict[str, float]:
    """{"scMMGPT (<method>): top-<k>": accuracy} of the model on `cells` (log1p values, as the main evaluation
    hands them) ranking every label of `label_texts`, seen in training or not."""
    jobs = ScMMGPTJobs(model, processor, label_texts, progress=progress, verbose=False)
    inputs = jobs.read(cells.matrix, cells.gene_names, normalize=False)
    row = {}
    for method in methods:
        annotation = jobs.annotate(inputs, list(label_texts), method=method)
        for k in ks:
            row[f"scMMGPT ({method}): top-{k}"] = top_k_accuracy(annotation.scores, annotation.labels, cells.labels, k)
    return row


def reference_top_k(train: EvalCells, cells: EvalCells, n_labels: int, ks=(1, 3)) -> dict[str, float]:
    """References for `evaluate_unseen_types`: logistic regression on all genes fitted on `train` (its top-k over the
    types it knows: 0 on a type it never saw) and chance (k of `n_labels`)."""
    from sklearn.linear_model import LogisticRegression

    logistic = LogisticRegression(max_iter=2000).fit(train.matrix, train.labels)
    probabilities = logistic.predict_proba(cells.matrix)
    row = {f"{LOGISTIC}: top-{k}": top_k_accuracy(probabilities, list(logistic.classes_), cells.labels, k) for k in ks}
    row.update({f"chance: top-{k}": min(1.0, k / n_labels) for k in ks})
    return row


def marker_score_top_k(train: EvalCells, cells: EvalCells, markers: dict[str, list[str]], ks=(1, 3)) -> dict:
    """The reference for marker texts: no model, each cell scored for each label by the mean z-score of the label's
    marker genes (z over `train`'s cells, log1p values), as marker-based annotators (scType, CellAssign's prior)
    do; top-k over all labels of `markers`, seen or not. Markers absent from the genes are skipped."""
    mean, sd = train.matrix.mean(0), train.matrix.std(0) + 1e-6
    z = (cells.matrix - mean) / sd
    column = {gene: j for j, gene in enumerate(cells.gene_names)}
    labels = list(markers)
    scores = np.full((len(z), len(labels)), np.nan)
    for j, label in enumerate(labels):
        present = [column[g] for g in markers[label] if g in column]
        if present:
            scores[:, j] = z[:, present].mean(1)
    return {f"{MARKER_SCORE}: top-{k}": top_k_accuracy(np.nan_to_num(scores, nan=-np.inf), labels, cells.labels, k)
            for k in ks}


def held_out_types(labels, seed: int, n: int = 3, min_cells: int = 20) -> list[str]:
    """A seeded draw of `n` cell types among those with at least `min_cells` cells (enough to score each)."""
    types, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    eligible = types[counts >= min_cells]
    if len(eligible) < n:
        raise ValueError(f"only {len(eligible)} cell types have {min_cells} cells or more; {n} are to be held out")
    return sorted(np.random.default_rng(seed).choice(eligible, size=n, replace=False).tolist())


# ---------------------------------------------------------------------------------------------------- coarser labels
def coarse_truth(label_texts: dict[str, str], coarse_labels) -> dict[str, str]:
    """Trained label → the label of `coarse_labels` (Cell Ontology names) whose term covers it, nearest first;
    trained labels none covers are left out."""
    covered = trained_subtypes(cell_type_terms(list(coarse_labels)), label_texts)
    return {own: coarse for coarse, owns in covered.items() for own in owns}


def evaluate_coarse_labels(model, processor, train: EvalCells, cells: EvalCells, label_texts: dict[str, str],
                           label_sets: dict = COARSE_LABEL_SETS, progress: bool = False) -> dict[str, dict[str, float]]:
    """Annotation with Cell Ontology labels coarser than the training types ("T cell"), scored against each cell's
    type mapped up the ontology: retrieval as `annotate` does it (each label the best of its text and its trained
    subtypes') and by the labels' own texts alone, beside the model's own labels and logistic regression (fitted on
    the training types), mapped up, and the majority class of the training cells' mapped-up types.
    {"ontology labels: <set>": {"<method>: accuracy" / "<method>: macro_f1": value}}, over the cells whose type a
    label of the set covers."""
    jobs = ScMMGPTJobs(model, processor, label_texts, progress=progress, verbose=False)
    inputs = jobs.read(cells.matrix, cells.gene_names, normalize=False)
    fine = {RETRIEVAL + ", own labels mapped up": jobs.annotate(inputs, list(label_texts)).predictions,
            LOGISTIC + ", mapped up": fit_annotation_baselines(train, None, names=(LOGISTIC,))[LOGISTIC].predict(
                cells.matrix)}
    results = {}
    for name, coarse in label_sets.items():
        up = coarse_truth(label_texts, coarse)
        kept = np.isin(cells.labels, list(up))
        if not kept.any():  # another dataset's types: this set covers none of them
            continue
        majority = max(coarse, key=[up.get(label) for label in train.labels].count)  # of the coarse labels
        predicted = {WITH_SUBTYPES: jobs.annotate(inputs, list(coarse)).predictions,
                     TEXT_ONLY: jobs.annotate(inputs, list(coarse), subtypes=False).predictions,
                     **{method: [up.get(p) for p in labels] for method, labels in fine.items()},
                     "majority class": [majority] * len(kept)}
        results[f"ontology labels: {name}"] = _scores_row(
            [up[label] for label in cells.labels[kept]],
            {method: [p for p, keep in zip(labels, kept) if keep] for method, labels in predicted.items()})
    return results


# ---------------------------------------------------------------------------------------------------- tables
def _mean(value) -> float:
    """A figure of one run, or the mean of a summary's [mean, sd]."""
    return float(value[0] if isinstance(value, (list, tuple)) else value)


def _figure(value) -> str:
    return f"{value[0]:.3f} ± {value[1]:.3f}" if isinstance(value, (list, tuple)) else f"{value:.3f}"


def _methods(rows: dict, metric: str) -> list[str]:
    """Methods having `metric` in any row, in first-seen order."""
    names = [key.rsplit(": ", 1)[0] for row in rows.values() for key in row if key.endswith(f": {metric}")]
    return list(dict.fromkeys(names))


def shift_table(shifts: dict, first: str = "shift") -> str:
    """Markdown: a row per shift (or other `first` column), a column per method (accuracy / macro-F1), and the
    descriptions' share."""
    methods = _methods(shifts, "accuracy")
    described = any(f"{DESCRIPTIONS}: share" in row for row in shifts.values())
    lines = [f"| {first} | " + " | ".join(methods) + (f" | {DESCRIPTIONS}" if described else "") + " |",
             "|---" * (1 + len(methods) + described) + "|",
             "| | " + " | ".join(["accuracy / macro-F1"] * len(methods)) + (" | share" if described else "") + " |"]
    for shift, row in shifts.items():
        cells = [f"{_figure(row[f'{m}: accuracy'])} / {_mean(row[f'{m}: macro_f1']):.3f}" for m in methods]
        if described:
            cells.append(_figure(row[f"{DESCRIPTIONS}: share"]))
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unseen_table(unseen: dict) -> str:
    """Markdown: a row per cell group × method, columns top-1 and top-3."""
    ks = sorted({int(key.rsplit("top-", 1)[1]) for row in unseen.values() for key in row})
    lines = ["| cells | method | " + " | ".join(f"top-{k}" for k in ks) + " |", "|---|---" + "|---" * len(ks) + "|"]
    for group, row in unseen.items():
        for method in _methods({group: row}, f"top-{ks[0]}"):
            lines.append(f"| {group} | {method} | " + " | ".join(_figure(row[f"{method}: top-{k}"]) for k in ks) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- goals
def shift_goals(shifts: dict) -> list[tuple[str, bool]]:
    """Issue 16's goals under shift, as (line, met): at 50 % depth, 70 % genes and σ 0.3, retrieval accuracy within
    5 points of its clean score and at or above logistic regression's; under the combined shift, at or above it."""
    goals = []
    accuracy = {shift: {m: _mean(row[f"{m}: accuracy"]) for m in (RETRIEVAL, LOGISTIC) if f"{m}: accuracy" in row}
                for shift, row in shifts.items()}
    clean = accuracy.get("clean", {}).get(RETRIEVAL)
    for shift in (*GOAL_SHIFTS, "combined"):
        ours, theirs = accuracy.get(shift, {}).get(RETRIEVAL), accuracy.get(shift, {}).get(LOGISTIC)
        if ours is None:
            continue
        if shift != "combined" and clean is not None:
            goals.append((f"retrieval under {shift} within 5 points of clean: {ours:.3f} vs {clean:.3f}",
                          ours >= clean - 0.05))
        if theirs is not None:
            goals.append((f"retrieval under {shift} at or above logistic regression: {ours:.3f} vs {theirs:.3f}",
                          ours >= theirs))
    return goals


def unseen_goals(unseen: dict) -> list[tuple[str, bool]]:
    """Issue 16's goals on unseen types, per method: top-1 ≥ 0.5 on held-out-type cells, and seen-type top-1 within
    3 points of (or above) the all-types model's."""
    goals = []
    for method in _methods({UNSEEN: unseen.get(UNSEEN, {})}, "top-1"):
        if method.startswith("scMMGPT"):
            top1 = _mean(unseen[UNSEEN][f"{method}: top-1"])
            goals.append((f"{method} top-1 on held-out-type cells ≥ 0.5 (chance "
                          f"{_mean(unseen[UNSEEN].get('chance: top-1', float('nan'))):.1f}): {top1:.3f}", top1 >= 0.5))
            key = f"{method}: top-1"
            if key in unseen.get(SEEN, {}) and key in unseen.get(SEEN_ALL_TYPES, {}):
                seen, every = _mean(unseen[SEEN][key]), _mean(unseen[SEEN_ALL_TYPES][key])
                goals.append((f"{method} top-1 on seen-type cells within 3 points of the all-types model: "
                              f"{seen:.3f} vs {every:.3f}", seen >= every - 0.03))
    return goals


def goal_lines(goals: list[tuple[str, bool]]) -> str:
    """Markdown list: each goal with **met** / **not met**."""
    return "\n".join(f"- {'**met**' if met else '**not met**'}: {line}" for line, met in goals)


__all__ = ["CountCells", "source_library_sizes", "baseline_matrix", "named_type_share", "evaluate_shifts",
           "top_k_accuracy", "evaluate_unseen_types", "reference_top_k", "held_out_types", "shift_table",
           "unseen_table", "shift_goals", "unseen_goals", "goal_lines", "SHIFT_BASELINES", "DESCRIPTIONS", "UNSEEN",
           "SEEN", "SEEN_ALL_TYPES"]
