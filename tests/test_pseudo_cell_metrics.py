"""Pseudo-cell metrics (issue 17): the bracket on real PBMC cells, the estimators on synthetic sets, the reference
generators, the offline `evaluate` module, the goal lines and the seeds summary."""

import numpy as np
import pytest

from scmmgpt_train.data import build_dataset
from scmmgpt_train.evaluate import (
    FIDELITY_CLASSIFIER,
    GAUSSIAN_BASELINE,
    METRICS_DIR,
    NB_BASELINE,
    NOISY_MEAN_BASELINE,
    PSEUDO_CELL_BASELINES,
    REAL_CELLS_REFERENCE,
    REAL_HELD_OUT,
    TYPE_MEAN_REFERENCE,
    EvalCells,
    evaluate_pseudo_cells,
    fit_annotation_baselines,
    fit_pca,
    noisy_mean_cells,
    pseudo_cell_table,
)
from scmmgpt_train.pseudo_cell_metrics import (
    METRICS,
    MIN_HELD_OUT_CELLS,
    SCORED_TYPES,
    energy_distance,
    fit_negative_binomial,
    gene_statistics,
    marker_genes,
    negative_binomial_cells,
    pca_gaussian_cells,
    pearson,
    pseudo_cell_goals,
    reference_rows,
    sample_negative_binomial,
    score_pseudo_cells,
    won_key,
)
from scmmgpt_train.splits import split_dataset
from scmmgpt_train.stage1 import label_texts_of

GENERATOR = "half-noise type means (synthetic)"  # stands in for a model: type means + 0.5 × the type's sd


@pytest.fixture(scope="module")
def pbmc_80_20(pbmc_path):
    """PBMC's `.raw` cells with `bulk_labels`, the demo's seeded 80/20 split."""
    dataset, tokenizer = build_dataset(pbmc_path, return_tokenizer=True, label_column="bulk_labels")
    splits = split_dataset(dataset, by="cell", test_size=0.2, seed=0)
    train, test = (EvalCells.from_rows(splits[s], tokenizer) for s in ("train", "test"))
    return train, test, list(label_texts_of(dataset))


@pytest.fixture(scope="module")
def bracket(pbmc_80_20):
    train, test, types = pbmc_80_20
    generated = {GENERATOR: noisy_mean_cells(train, types, 50, noise=0.5, seed=1)}
    return evaluate_pseudo_cells(train, test, types, generated, fit_pca(train), n_per_type=50, seed=0)


# ---------------------------------------------------------------------------------------------------- the bracket
def test_real_cells_score_near_the_ideal_and_the_type_mean_badly(bracket, pbmc_80_20):
    _, test, types = pbmc_80_20
    print("\n" + pseudo_cell_table(bracket))
    real, centre = bracket[REAL_CELLS_REFERENCE], bracket[TYPE_MEAN_REFERENCE]
    # energy distance: real draws at the floor (unbiased: ~0), far below the collapse and below every baseline
    assert abs(real["energy_distance"]) < 0.05 * centre["energy_distance"]
    assert all(real["energy_distance"] < row["energy_distance"] for name, row in bracket.items()
               if name not in (REAL_CELLS_REFERENCE, REAL_HELD_OUT))
    # diversity: real spread ~1 (the reference cells are outside the PCA's fit), collapse exactly 0
    assert 0.85 < real["diversity"] < 1.15 and centre["diversity"] == 0
    assert 0.85 < real["diversity"] < 1.15 and bracket[NOISY_MEAN_BASELINE]["diversity"] < 0.8
    # per-gene statistics: a single centre has no variance; real cells' detection rates match
    assert centre["variance_correlation"] == 0 and real["variance_correlation"] > 0.6
    assert real["detection_correlation"] > 0.8 > bracket[NOISY_MEAN_BASELINE]["detection_correlation"]
    assert real["detection_correlation"] > 0.8 > centre["detection_correlation"]
    assert real["mean_correlation"] > 0.9
    # fidelity: real cells near the held-out yardstick; the centre scores 1.0 (the metric is one-sided)
    assert abs(real["classifier_accuracy"] - bracket[REAL_HELD_OUT]["classifier_accuracy"]) < 0.1
    assert centre["classifier_accuracy"] == 1.0
    few = sorted(t for t in types if (test.labels == t).sum() < MIN_HELD_OUT_CELLS)
    assert sorted(real["types_too_few_cells"]) == few and few and real["pca_components"] == 50
    assert sorted(real["energy_distance_per_type"]) == sorted(set(types) - set(few))


def test_generated_rows_count_types_below_each_baseline(bracket):
    row = bracket[GENERATOR]
    assert row[SCORED_TYPES] == len(row["energy_distance_per_type"]) >= 6
    for baseline in PSEUDO_CELL_BASELINES:
        ours, theirs = row["energy_distance_per_type"], bracket[baseline]["energy_distance_per_type"]
        assert row[won_key(baseline)] == sum(ours[t] < theirs[t] for t in ours)
    assert row[won_key(NB_BASELINE)] < row[SCORED_TYPES]  # half the spread: closer to collapse than the NB draws
    assert row["expression"].shape == (500, 765) and set(row["marker_genes"]) == set(bracket[GENERATOR]["labels"])
    assert REAL_HELD_OUT in bracket and set(bracket[REAL_HELD_OUT]) == {"classifier_accuracy"}


def test_marker_genes_are_the_types_known_markers(pbmc_80_20):
    train, _, _ = pbmc_80_20
    markers = marker_genes(train.matrix, train.labels, train.gene_names)
    assert all(len(genes) == 3 for genes in markers.values())
    assert "CD79A" in markers["CD19+ B"] and {"NKG7", "GNLY"} <= set(markers["CD56+ NK"])
    assert {"CD3D", "IL32"} <= set(markers["CD4+/CD25 T Reg"])


# ---------------------------------------------------------------------------------------------------- estimators
def test_energy_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 10))
    assert energy_distance([[0.0]], [[3.0]]) == pytest.approx(6.0)  # two point masses: 2·|a − b|
    itself = energy_distance(x, x)
    assert abs(itself) < 0.05 and itself <= 0  # unbiased within terms: −2·E|X−X'|/n, ~0
    same = energy_distance(x, rng.standard_normal((300, 10)))
    shifted = [energy_distance(x, x + shift) for shift in (0.25, 0.5, 1.0, 2.0)]
    assert abs(same) < 0.05 < shifted[0] and np.all(np.diff(shifted) > 0)
    assert energy_distance(x, x * 0.3) > 0.5  # a collapsed set is far from the real spread
    assert energy_distance(x[:50], x[50:120]) == pytest.approx(energy_distance(x[50:120], x[:50]))
    with pytest.raises(ValueError, match="both sides"):
        energy_distance(x[:0], x)


def test_gene_statistics_and_pearson_on_hand_values():
    stats = gene_statistics(np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 0.0]]))
    assert stats["mean"].tolist() == [0.0, 2.0, 1.0] and stats["variance"].tolist() == [0.0, 1.0, 1.0]
    assert stats["detection"].tolist() == [0.0, 1.0, 0.5]
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert pearson([0, 0, 0], [1, 2, 3]) == 0.0  # a constant vector has nothing to agree on


# ---------------------------------------------------------------------------------------------------- baselines
def test_negative_binomial_fit_recovers_means_and_dispersions():
    rng = np.random.default_rng(0)
    mu, phi = np.array([0.5, 5.0, 20.0, 3.0]), np.array([0.0, 0.5, 0.2, 1.0])
    size_factors = rng.uniform(0.5, 1.5, 40_000)
    counts = sample_negative_binomial(mu * size_factors[:, None], phi, rng)
    assert counts.dtype == np.float64 and (counts == np.round(counts)).all()
    fitted_mu, fitted_phi = fit_negative_binomial(counts, size_factors)
    np.testing.assert_allclose(fitted_mu, mu, rtol=0.03)
    np.testing.assert_allclose(fitted_phi, phi, atol=0.04)


def test_baseline_draws_are_reproducible_with_a_seed(pbmc_80_20):
    train, _, types = pbmc_80_20
    cells, labels = negative_binomial_cells(train, types, 30, seed=3)
    again, _ = negative_binomial_cells(train, types, 30, seed=3)
    other, _ = negative_binomial_cells(train, types, 30, seed=4)
    assert cells.shape == (30 * len(types), 765) and cells.dtype == np.float32 and (cells >= 0).all()
    assert np.array_equal(cells, again) and not np.array_equal(cells, other)
    assert labels.tolist() == [t for t in types for _ in range(30)]
    for cell_type in types:  # each type's draws sit on its training cells' mean profile
        assert pearson(cells[labels == cell_type].mean(0), train.matrix[train.labels == cell_type].mean(0)) > 0.9
    pca = fit_pca(train)
    gaussian, _ = pca_gaussian_cells(train, types, 30, pca, seed=3)
    assert np.array_equal(gaussian, pca_gaussian_cells(train, types, 30, pca, seed=3)[0]) and (gaussian >= 0).all()
    with pytest.raises(ValueError, match="no training cells of type 'Platelet'"):
        negative_binomial_cells(train, ["Platelet"], 5)


def test_reference_rows_take_at_most_half_of_each_type(pbmc_80_20):
    train, _, types = pbmc_80_20
    rows = reference_rows(train.labels, types, 50, seed=0)
    assert len(set(rows)) == len(rows) and np.array_equal(rows, reference_rows(train.labels, types, 50, seed=0))
    for cell_type in types:
        picked, total = (train.labels[rows] == cell_type).sum(), (train.labels == cell_type).sum()
        assert picked == min(50, total // 2)


# ---------------------------------------------------------------------------------------------------- evaluate module
def test_evaluate_module_loads_offline_and_matches_the_functions(pbmc_80_20):
    import evaluate

    train, test, types = pbmc_80_20
    generated, labels = noisy_mean_cells(train, types, 10, noise=0.7, seed=2)
    metric = evaluate.load(str(METRICS_DIR / "pseudo_cells"))
    out = metric.compute(predictions=list(generated), references=list(labels), real_cells=test.matrix,
                         real_labels=test.labels, train_cells=train.matrix, train_labels=train.labels)
    pca = fit_pca(train)
    classifier = fit_annotation_baselines(train, pca, names=[FIDELITY_CLASSIFIER])[FIDELITY_CLASSIFIER]
    direct = score_pseudo_cells(test.matrix, test.labels, generated, labels, pca, classifier)
    assert {key: out[key] for key in METRICS} == pytest.approx({key: direct[key] for key in METRICS}, abs=1e-9)
    assert out["energy_distance_per_type"] == pytest.approx(direct["energy_distance_per_type"], abs=1e-9)
    assert out["types_too_few_cells"] == direct["types_too_few_cells"] and out["pca_components"] == 50


# ---------------------------------------------------------------------------------------------------- goals, summary
def _rows(accuracy=0.95, energy=0.2, won=8.0, variance=0.85, detection=0.92, diversity=1.1):
    model = {"classifier_accuracy": accuracy, "energy_distance": energy, "variance_correlation": variance,
             "detection_correlation": detection, "diversity": diversity, SCORED_TYPES: 10.0,
             **{won_key(b): won for b in PSEUDO_CELL_BASELINES}}
    return {"scMMGPT": model, REAL_HELD_OUT: {"classifier_accuracy": 0.84},
            **{b: {"energy_distance": 0.5} for b in PSEUDO_CELL_BASELINES}}


def test_goal_lines_say_met_or_not_for_one_run_and_for_a_summary():
    goals = pseudo_cell_goals(_rows(), "scMMGPT", PSEUDO_CELL_BASELINES, REAL_HELD_OUT)
    assert len(goals) == 4 + len(PSEUDO_CELL_BASELINES) and all(met for _, met in goals)
    assert "0.950 (real held-out cells: 0.840)" in goals[0][0] and "8 of 10 scored types (goal ≥ 8)" in goals[1][0]
    missed = dict(pseudo_cell_goals(_rows(accuracy=0.8, won=7.0, diversity=1.4), "scMMGPT", PSEUDO_CELL_BASELINES,
                                    REAL_HELD_OUT))
    assert sum(not met for met in missed.values()) == 1 + len(PSEUDO_CELL_BASELINES) + 1
    summary = {name: {k: [v, 0.01] for k, v in row.items()} for name, row in _rows(energy=0.6).items()}
    goals = pseudo_cell_goals(summary, "scMMGPT", PSEUDO_CELL_BASELINES, REAL_HELD_OUT)
    assert [met for _, met in goals] == [True, False, False, False, True, True, True]


def test_seed_summary_picks_up_the_pseudo_cell_figures(bracket):
    from scmmgpt_train.demo import summarize_seeds
    from scmmgpt_train.report import pseudo_cell_sections

    def run(shift):
        rows = {name: {**row, **{k: row[k] + shift for k in METRICS if k in row}} for name, row in bracket.items()}
        return {"annotation": {}, "description": {}, "pseudo_cells": rows}

    summary, table = summarize_seeds({0: run(0.0), 1: run(0.1)})
    model = summary["pseudo_cells"][GENERATOR]
    assert set(METRICS) | {"knn_accuracy", SCORED_TYPES, won_key(GAUSSIAN_BASELINE)} <= set(model)
    assert model["energy_distance"] == pytest.approx([bracket[GENERATOR]["energy_distance"] + 0.05, 0.05])
    assert summary["pseudo_cells"][REAL_HELD_OUT] == {"classifier_accuracy": pytest.approx(
        [bracket[REAL_HELD_OUT]["classifier_accuracy"] + 0.05, 0.05])}
    assert f"| pseudo_cells | {GENERATOR} | diversity |" in table
    lines = pseudo_cell_sections({"scMMGPT": model, **summary["pseudo_cells"]})
    assert "Goals (issue 17):" in lines and lines[-1].count("- **") == 4 + len(PSEUDO_CELL_BASELINES)


def test_report_section_draws_both_figures(bracket, pbmc_80_20, tmp_path):
    from scmmgpt_train.plots import marker_gene_statistics
    from scmmgpt_train.report import pseudo_cell_sections

    _, test, _ = pbmc_80_20
    rows = {"scMMGPT": bracket[GENERATOR], **bracket}
    lines = pseudo_cell_sections(rows, tmp_path, test)
    text = "\n".join(lines)
    assert "](umap.png)" in text and "](marker_genes.png)" in text and "(too few held-out cells: " in text
    assert "energy distance below per-type negative binomial" in text and "(real training cells: " in text
    for png in ("umap.png", "marker_genes.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = marker_gene_statistics(test.matrix, test.labels, rows["scMMGPT"]["expression"], rows["scMMGPT"]["labels"],
                                   test.gene_names, rows["scMMGPT"]["marker_genes"], MIN_HELD_OUT_CELLS)
    scored = len(rows["scMMGPT"]["energy_distance_per_type"])
    assert len(stats["gene"]) == 3 * scored and (stats["real_variance"] >= 0).all()
    b_cells = (stats["type"] == "CD19+ B") & (stats["gene"] == "CD79A")
    real_b = test.matrix[test.labels == "CD19+ B", test.gene_names.index("CD79A")]
    assert stats["real_mean"][b_cells] == pytest.approx(real_b.mean(), rel=1e-5)


def test_generated_cells_are_asked_for_as_log1p_values_where_the_decoder_samples():
    from types import SimpleNamespace

    from scmmgpt_train.evaluate import generate_pseudo_cells

    class Jobs:
        def __init__(self, distribution, takes_output=True):
            self.expression_distribution, self.asked = distribution, []
            if not takes_output:  # jobs from before the sampling decoder
                self.generate_cells = lambda texts, n_per_text, seed: self._cells(texts, n_per_text, None)

        def generate_cells(self, texts, n_per_text=1, seed=None, *, output=None):
            return self._cells(texts, n_per_text, output)

        def _cells(self, texts, n_per_text, output):
            self.asked.append(output)
            return SimpleNamespace(expression=np.zeros((len(texts) * n_per_text, 3), dtype=np.float32))

    for distribution, takes_output, asked in (("nb", True, "log1p"), ("zinb", True, "log1p"), ("mse", True, None),
                                              ("nb", False, None)):
        jobs = Jobs(distribution, takes_output)
        assert generate_pseudo_cells(jobs, ["a", "b"], 4, seed=1).shape == (8, 3) and jobs.asked == [asked]
