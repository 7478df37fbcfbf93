"""Pseudo-cells judged as draws from their cell type: do generated cells look like real cells of the prompted type?

Generated cells (log1p(CP10k) values, cells × genes, one prompted type per cell) are compared with the real held-out
cells of each type (issue 17):

- fidelity: a logistic regression on all genes, fitted on real training cells, classifies the generated cells
  (`classifier_accuracy`); its accuracy on the real held-out cells is the yardstick;
- distribution: per type, the energy distance between generated and real held-out cells in the PCA space fitted on
  real training cells (`energy_distance`, the mean over scored types, `energy_distance_per_type`). The estimator is
  unbiased (each set's own mean distance over distinct pairs), so real cells of the type score ~0 however few they
  are, and a set that sits at the type's centre scores about (2 - √2) × the type's spread: it is never rewarded for
  collapse. A single generated cell counts as a point mass (its own spread 0);
- per-gene statistics per type: Pearson correlation over genes of the generated and real per-gene mean, variance and
  detection rate (share of cells with a value > 0), mean over scored types; a constant vector (the variance of a
  single cell) correlates 0;
- diversity: the mean pairwise distance (PCA space) within a type's generated cells over that of its real held-out
  cells, mean over scored types; 1 is real spread, 0 collapse.

A type is scored when it has at least `min_cells` real held-out cells (`MIN_HELD_OUT_CELLS`, 5); fewer, and its
spread and detection rates are too noisy to rank generators (the types left out are listed in `types_too_few_cells`;
on PBMC's 20 % split, seeds 0-2, two or three of the ten types). With so few real cells per type the ideal's own
per-gene figures stay below 1: issue 17's goals of 0.8 (variance) and 0.9 (detection rate) sit above what real
training cells reach here (0.74 and 0.87).

The ideal reference, real training cells scored as if generated, must come from cells outside the scoring fits
(`reference_rows`): cells inside the PCA's fit spread more along its components than new cells do (PBMC, 50 PCs:
diversity 1.43 instead of 1.00, energy distance 0.35 instead of ~0) and the classifier knows them (accuracy 1.0
instead of the held-out 0.84). The PCA and the classifier are therefore fitted on the training cells outside the
reference draws; generated cells are new cells, as held-out ones are.

The classifier accuracy and the mean correlation are one-sided: the first asks whether a cell is recognisable as its
type, and a type's centre is the most recognisable cell there is (PBMC, 80/20 split, seeds 0-2: the per-type mean
scores 1.000, real cells 0.802, the held-out yardstick 0.836); the second checks location only, which the training
cells' mean estimates best (0.932 vs real cells' 0.915: the reference holds at most half of a type's cells). Read
them with the distribution figures, which a collapsed generator fails (energy distance 4.48 vs -0.07, variance
correlation 0 vs 0.74, detection-rate correlation 0.33 vs 0.87, diversity 0 vs 1.01; 50 cells per type).

Reference generators, fitted on the real training cells: `negative_binomial_cells` (per type and gene, a negative
binomial fitted by moments on the counts rebuilt from the log1p values) and `pca_gaussian_cells` (per type, a
Gaussian in PCA space); `evaluate.noisy_mean_cells` and `evaluate.real_cell_draws` give the others.
"""

from __future__ import annotations

import math

import numpy as np

from .shifts import counts_from_log1p, smallest_count_library_sizes

MIN_HELD_OUT_CELLS = 5
METRICS = ("classifier_accuracy", "energy_distance", "mean_correlation", "variance_correlation",
           "detection_correlation", "diversity")


# ---------------------------------------------------------------------------------------------------- statistics
def _mean_within_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over distinct pairs of rows of `x` (n, d); 0 for a single row (a point mass)."""
    from scipy.spatial.distance import pdist

    return float(pdist(x).mean()) if len(x) > 1 else 0.0


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2·E|X−Y| − E|X−X'| − E|Y−Y'| between the rows of `x` (m, d) and `y` (n, d), Euclidean, with
    the within-set terms over distinct pairs (unbiased: ~0 for two samples of one distribution, may dip below 0)."""
    from scipy.spatial.distance import cdist

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"energy distance needs cells on both sides, got {len(x)} and {len(y)}")
    return float(2 * cdist(x, y).mean() - _mean_within_distance(x) - _mean_within_distance(y))


def gene_statistics(cells: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene mean, variance and detection rate (share of cells > 0) of `cells` (cells, genes): each (genes,)."""
    cells = np.asarray(cells, dtype=np.float64)
    return {"mean": cells.mean(0), "variance": cells.var(0), "detection": (cells > 0).mean(0)}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors; 0 where either is constant (nothing to agree on)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def marker_genes(matrix: np.ndarray, labels, gene_names: list[str], n: int = 3) -> dict[str, list[str]]:
    """Each type's `n` genes of largest mean difference, the type's cells vs all others (`matrix` (cells, genes)
    log1p values, e.g. the training cells)."""
    labels = np.asarray(labels)
    markers = {}
    for cell_type in dict.fromkeys(labels):
        inside = labels == cell_type
        difference = matrix[inside].mean(0) - (matrix[~inside].mean(0) if (~inside).any() else 0)
        markers[str(cell_type)] = [gene_names[j] for j in np.argsort(-difference)[:n]]
    return markers


# ---------------------------------------------------------------------------------------------------- scores
def type_scores(generated: np.ndarray, real: np.ndarray, pca) -> dict[str, float]:
    """One type's figures: energy distance and diversity in `pca` space, per-gene correlations on the genes.
    `generated` (m, genes), `real` (n ≥ 2, genes) log1p values."""
    generated_pcs, real_pcs = pca.transform(generated), pca.transform(real)
    ours, theirs = gene_statistics(generated), gene_statistics(real)
    return {
        "energy_distance": energy_distance(generated_pcs, real_pcs),
        "mean_correlation": pearson(ours["mean"], theirs["mean"]),
        "variance_correlation": pearson(ours["variance"], theirs["variance"]),
        "detection_correlation": pearson(ours["detection"], theirs["detection"]),
        "diversity": _mean_within_distance(generated_pcs) / _mean_within_distance(real_pcs),
    }


def score_pseudo_cells(real_matrix: np.ndarray, real_labels, generated: np.ndarray, generated_labels, pca,
                       classifier, min_cells: int = MIN_HELD_OUT_CELLS) -> dict:
    """Generated cells against real held-out cells of their types.

    Args:
        real_matrix: (cells, genes) log1p values of the real held-out cells; `real_labels` their types.
        generated: (cells, genes) generated log1p values, same genes; `generated_labels` each one's prompted type.
        pca: fitted on the real training cells (`evaluate.fit_pca`); distances are Euclidean in its space.
        classifier: fitted on the real training cells (`predict` of (cells, genes) matrices).
        min_cells: a type needs this many real held-out cells to be scored.

    Returns `classifier_accuracy` and the means over scored types of `energy_distance`, `mean_correlation`,
    `variance_correlation`, `detection_correlation` and `diversity` (floats); `per_type` ({type: those figures}),
    `energy_distance_per_type`, `types_too_few_cells` (generated types with fewer real cells) and `pca_components`.
    The means are NaN when no type has `min_cells` real cells.
    """
    real_labels, generated_labels = np.asarray(real_labels), np.asarray(generated_labels)
    generated = np.asarray(generated, dtype=np.float32)
    if generated.shape[1:] != real_matrix.shape[1:] or len(generated) != len(generated_labels):
        raise ValueError(f"generated cells {generated.shape} with {len(generated_labels)} labels do not match the "
                         f"real cells' genes {real_matrix.shape[1:]}")
    accuracy = float(np.mean(classifier.predict(generated) == generated_labels))
    per_type, too_few = {}, []
    for cell_type in dict.fromkeys(generated_labels):
        real = real_matrix[real_labels == cell_type]
        if len(real) < max(min_cells, 2):
            too_few.append(str(cell_type))
            continue
        per_type[str(cell_type)] = type_scores(generated[generated_labels == cell_type], real, pca)
    # no type with enough real cells: NaN figures (and every type in `types_too_few_cells`), not a made-up score
    means = {key: float(np.mean([row[key] for row in per_type.values()])) if per_type else float("nan")
             for key in METRICS[1:]}
    return {"classifier_accuracy": accuracy, **means, "per_type": per_type,
            "energy_distance_per_type": {t: row["energy_distance"] for t, row in per_type.items()},
            "types_too_few_cells": too_few, "pca_components": int(pca.n_components_)}


def types_won(row: dict, other: dict) -> tuple[int, int]:
    """(types where `row`'s energy distance is below `other`'s, types both scored) of two `score_pseudo_cells`
    results."""
    ours, theirs = row["energy_distance_per_type"], other["energy_distance_per_type"]
    shared = [t for t in ours if t in theirs]
    return sum(ours[t] < theirs[t] for t in shared), len(shared)


# ---------------------------------------------------------------------------------------------------- baselines
def fit_negative_binomial(counts: np.ndarray, size_factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene negative binomial by the method of moments, with each cell's size factor s_i (E Y = s_i·μ,
    Var Y = s_i·μ + s_i²·μ²·φ): μ = mean(Y_i / s_i), φ = (Σ(Y_i − s_i·μ)² − μ·Σs_i) / (μ²·Σs_i²), clipped at 0
    (Poisson). `counts` (cells, genes), `size_factors` (cells,). Returns (μ, φ), each (genes,)."""
    counts, s = np.asarray(counts, dtype=np.float64), np.asarray(size_factors, dtype=np.float64)
    mu = (counts / s[:, None]).mean(0)
    excess = ((counts - s[:, None] * mu) ** 2).sum(0) - mu * s.sum()
    phi = np.divide(excess, mu ** 2 * (s ** 2).sum(), out=np.zeros_like(mu), where=mu > 0)
    return mu, np.clip(phi, 0, None)


def sample_negative_binomial(mu: np.ndarray, phi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts drawn as Poisson(Gamma(1/φ, μ·φ)) (negative binomial of mean μ, dispersion φ; Poisson where φ = 0).
    `mu` (cells, genes), `phi` (genes,)."""
    phi = np.broadcast_to(phi, mu.shape)
    rate = mu.copy()
    overdispersed = (phi > 0) & (mu > 0)
    rate[overdispersed] = rng.gamma(1 / phi[overdispersed], mu[overdispersed] * phi[overdispersed])
    return rng.poisson(rate).astype(np.float64)


def negative_binomial_cells(train, types: list[str], n_per_type: int, seed: int = 0,
                            target_sum: float = 1e4) -> tuple[np.ndarray, np.ndarray]:
    """Baseline pseudo-cells a user would write without a model: per type, a negative binomial per gene fitted on the
    training cells' counts (`fit_negative_binomial`), drawn at library sizes resampled from the type's cells, then
    log1p(counts / library size · `target_sum`). Counts and library sizes are rebuilt from the stored log1p values
    as the shift suite does (each cell's smallest expressed value one read: `shifts.smallest_count_library_sizes`).
    `train`: `EvalCells`. Returns ((n_per_type · types, genes) float32, labels)."""
    rng = np.random.default_rng(seed)
    libraries = smallest_count_library_sizes(train.matrix, target_sum)
    counts = counts_from_log1p(train.matrix, libraries, target_sum)
    cells, labels = [], []
    for cell_type in types:
        rows = _type_rows(train, cell_type)
        mean_library = libraries[rows].mean()
        mu, phi = fit_negative_binomial(counts[rows], libraries[rows] / mean_library)
        drawn = rng.choice(libraries[rows], size=n_per_type)
        draws = sample_negative_binomial(mu * (drawn / mean_library)[:, None], phi, rng)
        cells.append(np.log1p(draws / drawn[:, None] * target_sum))
        labels += [cell_type] * n_per_type
    return np.concatenate(cells).astype(np.float32), np.asarray(labels)


def pca_gaussian_cells(train, types: list[str], n_per_type: int, pca, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Baseline pseudo-cells: per type, a Gaussian (mean and covariance of the training cells' PCA scores) sampled in
    `pca` space, mapped back with `pca.inverse_transform` and clipped at 0. Returns ((n_per_type · types, genes)
    float32, labels)."""
    rng = np.random.default_rng(seed)
    cells, labels = [], []
    for cell_type in types:
        scores = pca.transform(train.matrix[_type_rows(train, cell_type)])
        covariance = np.cov(scores, rowvar=False) if len(scores) > 1 else np.zeros((scores.shape[1],) * 2)
        drawn = rng.multivariate_normal(scores.mean(0), covariance, size=n_per_type, method="eigh")
        cells.append(np.clip(pca.inverse_transform(drawn), 0, None))
        labels += [cell_type] * n_per_type
    return np.concatenate(cells).astype(np.float32), np.asarray(labels)


def reference_rows(labels, types: list[str], n_per_type: int, seed: int = 0) -> np.ndarray:
    """Indices of the real reference cells: `n_per_type` random cells of each type, at most half of a type's cells,
    so that the fits left to the other half (PCA, classifier) still know every type. `labels` (cells,)."""
    rng = np.random.default_rng(seed)
    labels, picked = np.asarray(labels), []
    for cell_type in types:
        rows = np.flatnonzero(labels == cell_type)
        picked.append(rng.choice(rows, size=min(n_per_type, rows.size // 2), replace=False))
    return np.concatenate(picked).astype(np.int64)


def _type_rows(train, cell_type: str) -> np.ndarray:
    rows = np.flatnonzero(train.labels == cell_type)
    if rows.size == 0:
        raise ValueError(f"no training cells of type {cell_type!r} to fit a baseline on")
    return rows


# ---------------------------------------------------------------------------------------------------- goals
def mean_figure(figure) -> float:
    """A figure of one run, or the mean of a seeds summary's [mean, sd]."""
    return float(figure[0] if isinstance(figure, (list, tuple)) else figure)


def won_key(baseline: str) -> str:
    """The model row's key for the count of types where its energy distance is below `baseline`'s."""
    return f"types below {baseline} on energy distance"


SCORED_TYPES = "types scored"


def pseudo_cell_goals(rows: dict, model: str, baselines: tuple[str, ...], yardstick: str, ideal: str | None = None,
                      share_of_types: float = 0.8) -> list[tuple[str, bool]]:
    """Issue 17's goals as (line, met) from the pseudo-cell rows of one run or of a seeds summary ([mean, sd]):
    classifier accuracy on generated cells ≥ 0.9; energy distance below each of `baselines` on the mean over types
    and for ≥ 80 % of the scored types (8 of 10); variance correlation ≥ 0.8; detection correlation ≥ 0.9;
    diversity within 0.7-1.3. `yardstick`: the row with the classifier's accuracy on real held-out cells; `ideal`:
    the real-cell reference row, whose figure each line shows beside the model's."""
    ours = rows[model]

    def beside(key: str, *references: tuple[str | None, str]) -> str:
        """The reference rows' figures, in brackets (the ideal's by default)."""
        shown = [f"{name}: {mean_figure(rows[row][key]):.3f}"
                 for row, name in references or ((ideal, "real training cells"),) if row in rows and key in rows[row]]
        return f" ({'; '.join(shown)})" if shown else ""

    accuracy = mean_figure(ours["classifier_accuracy"])
    goals = [(f"classifier accuracy on generated cells ≥ 0.9: {accuracy:.3f}"
              + beside("classifier_accuracy", (yardstick, "real held-out cells"), (ideal, "real training cells")),
              accuracy >= 0.9)]
    energy, scored = mean_figure(ours["energy_distance"]), mean_figure(ours.get(SCORED_TYPES, float("nan")))
    needed = math.ceil(share_of_types * scored - 1e-9) if scored == scored else float("nan")
    for baseline in baselines:
        if baseline in rows:
            theirs = mean_figure(rows[baseline]["energy_distance"])
            won = mean_figure(ours.get(won_key(baseline), float("nan")))
            goals.append((f"energy distance below {baseline}: mean {energy:.3f} vs {theirs:.3f}, lower on {won:.3g} "
                          f"of {scored:.3g} scored types (goal ≥ {needed}){beside('energy_distance')}",
                          energy < theirs and won >= needed))
    for key, name, low, high in (("variance_correlation", "per-gene variance correlation", 0.8, None),
                                 ("detection_correlation", "per-gene detection-rate correlation", 0.9, None),
                                 ("diversity", "diversity relative to real cells", 0.7, 1.3)):
        value = mean_figure(ours[key])
        bound = f"≥ {low}" if high is None else f"within {low}-{high}"
        goals.append((f"{name} {bound}: {value:.3f}{beside(key)}", low <= value <= (high or math.inf)))
    return goals


__all__ = ["energy_distance", "gene_statistics", "pearson", "marker_genes", "type_scores", "score_pseudo_cells",
           "types_won", "fit_negative_binomial", "sample_negative_binomial", "negative_binomial_cells",
           "pca_gaussian_cells", "reference_rows", "pseudo_cell_goals", "won_key", "mean_figure", "MIN_HELD_OUT_CELLS",
           "METRICS", "SCORED_TYPES"]
