"""The shift suite (`scmmgpt_train.shifts`, `scmmgpt_train.robustness`): each shift's properties, the counts rebuilt
from PBMC's log-normalised `.raw`, the suite runner on a tiny model, top-k scoring of unseen types, tables and goals."""

import numpy as np
import pytest

from modeling_scmmgpt.inputs_scmmgpt import value_kind
from scmmgpt_train.data import build_dataset
from scmmgpt_train.evaluate import EvalCells
from scmmgpt_train.robustness import (
    DESCRIPTIONS,
    SEEN,
    SEEN_ALL_TYPES,
    SHIFT_BASELINES,
    UNSEEN,
    CountCells,
    baseline_matrix,
    evaluate_shifts,
    held_out_types,
    marker_score_top_k,
    named_type_share,
    reference_top_k,
    shift_goals,
    shift_table,
    source_library_sizes,
    top_k_accuracy,
    unseen_goals,
    unseen_table,
)
from scmmgpt_train.shifts import (
    FULL_SUITE,
    OTHER_READS,
    SHORT_SUITE,
    Shift,
    apply_shift,
    batch_factors,
    counts_from_log1p,
    smallest_count_library_sizes,
    stochastic_round,
    thin_depth,
)
from scmmgpt_train.splits import split_dataset

SUITE = {shift.name: shift for shift in FULL_SUITE}


@pytest.fixture(scope="module")
def counts():
    """(200 cells, 300 genes) negative-binomial counts, a gene list and the reads on other genes."""
    rng = np.random.default_rng(0)
    matrix = rng.negative_binomial(2, 0.3, size=(200, 300)).astype(np.float64)
    return matrix, [f"G{j}" for j in range(300)], 4 * matrix.sum(1)


@pytest.fixture(scope="module")
def pbmc_cells(pbmc_path):
    dataset, tokenizer = build_dataset(pbmc_path, return_tokenizer=True, label_column="bulk_labels")
    splits = split_dataset(dataset, by="cell", test_size=0.2, seed=0)
    return splits, tokenizer, source_library_sizes(pbmc_path)


# ---------------------------------------------------------------------------------------------------- shifts
def test_depth_thinning_keeps_integer_counts_at_the_expected_share(counts):
    matrix, genes, other = counts
    for fraction in (0.5, 0.2, 0.1):
        shifted, names = apply_shift(matrix, genes, SUITE[f"depth {fraction:.0%}"], other)
        thinned = shifted[:, :-1]
        assert names == [*genes, OTHER_READS] and np.array_equal(thinned, np.round(thinned))
        assert (thinned <= matrix).all() and (shifted[:, -1] <= other).all()
        assert thinned.sum() / matrix.sum() == pytest.approx(fraction, rel=0.02)
        assert shifted[:, -1].sum() / other.sum() == pytest.approx(fraction, rel=0.02)
    assert np.array_equal(thin_depth(matrix, 1.0, np.random.default_rng(0)), matrix)


def test_gene_panel_drops_the_right_share_of_columns_and_names(counts):
    matrix, genes, other = counts
    for fraction in (0.7, 0.5):
        shifted, names = apply_shift(matrix, genes, SUITE[f"genes {fraction:.0%}"], other)
        kept = names[:-1]
        assert len(kept) == round(fraction * len(genes)) and shifted.shape == (len(matrix), len(kept) + 1)
        assert kept == sorted(set(kept), key=genes.index)  # a subset, in the original order
        columns = [genes.index(g) for g in kept]
        assert np.array_equal(shifted[:, :-1], matrix[:, columns])  # the kept genes' counts untouched


def test_batch_effect_factors_have_log_sd_sigma_and_rounding_is_unbiased(counts):
    for sigma in (0.3, 0.6):
        log_factors = np.log(batch_factors(20_000, sigma, np.random.default_rng(1)))
        assert log_factors.std() == pytest.approx(sigma, rel=0.03) and abs(log_factors.mean()) < 0.02
    rng = np.random.default_rng(2)
    values = np.full(100_000, 1.3)
    rounded = stochastic_round(values, rng)
    assert set(np.unique(rounded)) == {1.0, 2.0} and rounded.mean() == pytest.approx(1.3, abs=0.01)
    assert np.array_equal(stochastic_round(np.arange(5.0), rng), np.arange(5.0))
    matrix, genes, other = counts
    shifted, names = apply_shift(matrix, genes, SUITE["batch σ 0.6"], other)
    assert names == [*genes, OTHER_READS] and np.array_equal(shifted, np.round(shifted))
    ratio = np.log((shifted[:, :-1].sum(0) + 1) / (matrix.sum(0) + 1))  # per-gene log change ~ the factor
    assert 0.4 < ratio.std() < 0.8


def test_conventions_give_the_values_they_claim(counts):
    matrix, genes, other = counts
    library = matrix.sum(1) + other
    raw, names = apply_shift(matrix, genes, Shift("raw", "x", 0), other)
    assert names[-1] == OTHER_READS and np.array_equal(raw[:, :-1], matrix) and np.array_equal(raw[:, -1], other)
    cut, names = apply_shift(matrix, genes, SUITE["raw counts, model's genes only"], other)
    assert names == genes and np.array_equal(cut, matrix)
    for name, target in (("log1p(CP10k)", 1e4), ("log1p(CPM)", 1e6)):
        values, names = apply_shift(matrix, genes, SUITE[name], other)
        assert names == genes
        np.testing.assert_allclose(values, np.log1p(matrix / library[:, None] * target), rtol=1e-6)
        assert value_kind(values) == "log1p"  # what the jobs will detect
    assert value_kind(raw) == value_kind(cut) == "counts"


def test_shifts_are_seeded(counts):
    matrix, genes, other = counts
    for shift in FULL_SUITE[1:]:
        first, names = apply_shift(matrix, genes, shift, other, seed=0)
        again, same_names = apply_shift(matrix, genes, shift, other, seed=0)
        assert np.array_equal(first, again) and names == same_names
        if shift.family != "input convention":  # the conventions draw nothing
            other_seed, other_names = apply_shift(matrix, genes, shift, other, seed=1)
            assert other_names != names or not np.array_equal(first, other_seed), shift.name
    assert {s.name for s in SHORT_SUITE} == {"clean", "depth 50%", "genes 70%", "batch σ 0.3", "combined"}


def test_combined_shift_thins_drops_and_scales(counts):
    matrix, genes, other = counts
    shifted, names = apply_shift(matrix, genes, SUITE["combined"], other)
    assert len(names) - 1 == round(0.7 * len(genes))
    kept = [genes.index(g) for g in names[:-1]]
    assert shifted[:, :-1].sum() / matrix[:, kept].sum() == pytest.approx(0.5, rel=0.1)


# ---------------------------------------------------------------------------------------------------- counts
def test_counts_from_log1p_round_trip_and_fallback_library():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.5, size=(50, 40)).astype(np.float64)
    counts[:, 0] = 1  # every cell has a single read somewhere
    library = counts.sum(1) * 3
    log1p = np.log1p(counts / library[:, None] * 1e4)
    np.testing.assert_array_equal(counts_from_log1p(log1p, library), counts)
    np.testing.assert_allclose(smallest_count_library_sizes(log1p), library, rtol=1e-9)


def test_pbmc_counts_rebuilt_reproduce_the_stored_values(pbmc_cells):
    splits, tokenizer, library_sizes = pbmc_cells
    rows = splits["test"].select(range(40))
    cells, stored = CountCells.from_rows(rows, tokenizer, library_sizes), EvalCells.from_rows(rows, tokenizer)
    assert np.array_equal(cells.counts, np.round(cells.counts)) and (cells.other_reads > 0).all()
    assert cells.library_sizes == pytest.approx([library_sizes[r["cell_id"]] for r in rows])
    values, _ = apply_shift(cells.counts, cells.gene_names, SUITE["log1p(CP10k)"], cells.other_reads)
    np.testing.assert_allclose(values, stored.matrix, atol=2e-3)
    # the baselines' reading of clean counts + other reads: the training values too
    raw, names = apply_shift(cells.counts, cells.gene_names, FULL_SUITE[0], cells.other_reads)
    np.testing.assert_allclose(baseline_matrix(raw, names, cells.gene_names), stored.matrix, atol=2e-3)
    fallback = CountCells.from_rows(rows, tokenizer)  # no library sizes: the smallest value is one count
    assert np.array_equal(fallback.counts, cells.counts)


def test_baseline_matrix_puts_absent_genes_at_zero():
    matrix = np.array([[1.0, 3.0, 6.0]])
    out = baseline_matrix(matrix, ["B", "X", "C"], ["A", "B", "C"])
    np.testing.assert_allclose(out, np.log1p(np.array([[0.0, 1.0, 6.0]]) / 10 * 1e4), rtol=1e-6)
    logged = np.log1p(np.array([[0.5, 2.5]]))
    np.testing.assert_allclose(baseline_matrix(logged, ["C", "A"], ["A", "B", "C"]), [[logged[0, 1], 0, logged[0, 0]]],
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- the suite
def test_suite_runner_on_a_tiny_model(pbmc_cells, minilm_tokenizer):
    import copy

    import torch

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor
    from scmmgpt_train.stage1 import label_texts_of

    from .test_multimodal import tiny_config

    splits, tokenizer, library_sizes = pbmc_cells
    # short texts: descriptions are as long as the longest label text
    label_texts = {label: text.split(". ")[0] + "." for label, text in label_texts_of(splits["train"]).items()}
    processor = ScMMGPTProcessor(tokenizer, copy.deepcopy(minilm_tokenizer), num_query_tokens=4)
    torch.manual_seed(0)
    model = ScMMGPTForConditionalGeneration(tiny_config(len(tokenizer), len(processor.tokenizer))).eval()
    model.set_cell_token_ids(processor)
    train = EvalCells.from_rows(splits["train"].select(range(200)), tokenizer)
    test = CountCells.from_rows(splits["test"].select(range(8)), tokenizer, library_sizes)
    suite = (SUITE["clean"], SUITE["log1p(CPM)"], SUITE["combined"])
    results = evaluate_shifts(model, processor, train, test, label_texts, suite=suite, describe=True)
    methods = ["scMMGPT (retrieval)", *SHIFT_BASELINES]
    assert list(results) == [s.name for s in suite]
    for row in results.values():
        assert set(row) == {f"{m}: {metric}" for m in methods for metric in ("accuracy", "macro_f1")} | {
            f"{DESCRIPTIONS}: share"}
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in row.values())
    # logistic regression reads clean cells rebuilt with their whole library as in training
    assert results["clean"]["logistic regression (all genes): accuracy"] >= 0.5
    table = shift_table(results)
    assert table.count("\n") == 2 + len(suite) and DESCRIPTIONS in table


def test_coarse_labels_map_types_up_the_ontology_and_are_bracketed(pbmc_cells, minilm_tokenizer):
    import copy

    import torch

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor
    from scmmgpt_train.robustness import (COARSE_LABEL_SETS, TEXT_ONLY, WITH_SUBTYPES, coarse_truth,
                                          evaluate_coarse_labels)
    from scmmgpt_train.stage1 import label_texts_of

    from .test_multimodal import tiny_config

    splits, tokenizer, _ = pbmc_cells
    label_texts = label_texts_of(splits["train"])
    t_cells = ["CD4+/CD25 T Reg", "CD4+/CD45RA+/CD25- Naive T", "CD4+/CD45RO+ Memory", "CD8+ Cytotoxic T",
               "CD8+/CD45RA+ Naive Cytotoxic"]
    assert coarse_truth(label_texts, COARSE_LABEL_SETS["lineages"]) == {
        **dict.fromkeys(t_cells, "T cell"), "CD19+ B": "B cell", "CD56+ NK": "natural killer cell",
        "CD14+ Monocyte": "monocyte", "Dendritic": "dendritic cell", "CD34+": "hematopoietic precursor cell"}
    by_lineage = coarse_truth(label_texts, COARSE_LABEL_SETS["CD4 / CD8 T cells"])
    assert {t: by_lineage[t].split(",")[0] for t in t_cells} == {
        "CD4+/CD25 T Reg": "CD4-positive", "CD4+/CD45RA+/CD25- Naive T": "CD4-positive",
        "CD4+/CD45RO+ Memory": "CD4-positive", "CD8+ Cytotoxic T": "CD8-positive",
        "CD8+/CD45RA+ Naive Cytotoxic": "CD8-positive"}

    processor = ScMMGPTProcessor(tokenizer, copy.deepcopy(minilm_tokenizer), num_query_tokens=4)
    torch.manual_seed(0)
    model = ScMMGPTForConditionalGeneration(tiny_config(len(tokenizer), len(processor.tokenizer))).eval()
    model.set_cell_token_ids(processor)
    train = EvalCells.from_rows(splits["train"], tokenizer)
    test = EvalCells.from_rows(splits["test"].select(range(60)), tokenizer)
    sets = {**COARSE_LABEL_SETS, "neurons": ("neuron",)}  # covers no PBMC type: left out
    results = evaluate_coarse_labels(model, processor, train, test, label_texts, sets)
    assert list(results) == ["ontology labels: lineages", "ontology labels: CD4 / CD8 T cells"]
    up = coarse_truth(label_texts, COARSE_LABEL_SETS["lineages"])
    trained, truth = [up[label] for label in train.labels], [up[label] for label in test.labels]
    row = results["ontology labels: lineages"]
    majority = max(set(trained), key=trained.count)  # dendritic cells: 240 of PBMC's 700, T cells 192 in 5 types
    assert row["majority class: accuracy"] == pytest.approx(truth.count(majority) / len(truth))
    assert row["logistic regression (all genes), mapped up: accuracy"] >= 0.85 > row["majority class: accuracy"]
    assert {f"{WITH_SUBTYPES}: accuracy", f"{TEXT_ONLY}: accuracy"} <= set(row)


def test_named_type_share():
    texts = {"B": "cell type: B cell. A lymphocyte.", "NK": "cell type: natural killer cell. A lymphocyte."}
    described = ["cell type: B cell. A lymphocyte of B lineage.", "cell type: B cell. Kills.", ""]
    assert named_type_share(described, ["B", "NK", "B"], texts) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------------- unseen types
def test_top_k_accuracy_on_a_hand_made_score_matrix():
    labels = ["a", "b", "c", "d"]
    scores = np.array([[0.9, 0.1, 0.0, 0.0],    # a first
                       [0.5, 0.4, 0.3, 0.0],    # c third
                       [0.1, 0.2, 0.3, 0.4],    # b third
                       [np.nan] * 4,            # no answer: a miss whatever k
                       [0.0, 0.0, 0.0, 1.0]])   # true label not among the labels
    references = ["a", "c", "b", "a", "z"]
    assert top_k_accuracy(scores, labels, references, 1) == pytest.approx(1 / 5)
    assert top_k_accuracy(scores, labels, references, 3) == pytest.approx(3 / 5)
    assert top_k_accuracy(scores, labels, references, 4) == pytest.approx(3 / 5)


def test_reference_top_k_cannot_name_an_unseen_type():
    rng = np.random.default_rng(0)
    centres = {"a": 0.0, "b": 3.0, "c": 6.0}
    make = lambda types, n: EvalCells(np.concatenate([rng.normal(centres[t], 0.3, (n, 5)) for t in types]),
                                      np.repeat(types, n), [""] * (n * len(types)), [f"G{j}" for j in range(5)])
    train, seen, unseen = make(["a", "b"], 20), make(["a", "b"], 10), make(["c"], 10)
    assert reference_top_k(train, seen, 10) == pytest.approx({
        "logistic regression (all genes): top-1": 1.0, "logistic regression (all genes): top-3": 1.0,
        "chance: top-1": 0.1, "chance: top-3": 0.3})
    assert reference_top_k(train, unseen, 10)["logistic regression (all genes): top-3"] == 0.0


def test_marker_score_names_types_no_model_saw_by_their_markers():
    genes = ["MS4A1", "CD79A", "GNLY", "NKG7", "LYZ"]
    rng = np.random.default_rng(0)
    train = EvalCells(rng.normal(1.0, 0.2, (30, 5)), np.repeat(["T"], 30), [""] * 30, genes)

    def cells(high, n=4):  # log1p values: the type's markers well above the training cells' mean
        matrix = rng.normal(1.0, 0.2, (n, 5))
        matrix[:, [genes.index(g) for g in high]] += 2.0
        return matrix

    test = EvalCells(np.concatenate([cells(["MS4A1", "CD79A"]), cells(["GNLY", "NKG7"]), cells(["GNLY"])]),
                     np.array(["B"] * 4 + ["NK"] * 4 + ["NK"] * 4), [""] * 12, genes)
    markers = {"B": ["MS4A1", "CD79A", "CD19"], "NK": ["GNLY", "NKG7"], "monocyte": ["LYZ"], "mast": ["KIT"]}
    row = marker_score_top_k(train, test, markers)
    assert row == {"reference: marker-gene score (no training): top-1": 1.0,
                   "reference: marker-gene score (no training): top-3": 1.0}
    # CD19 and KIT are absent: skipped; "mast" (no marker present) is never ranked above a label that has one
    test.labels[:] = "mast"
    assert marker_score_top_k(train, test, markers, ks=(3,))["reference: marker-gene score (no training): top-3"] == 0


def test_held_out_types_are_a_seeded_draw_among_common_types():
    labels = ["rare"] * 5 + [t for t in "abcdefg" for _ in range(25)]
    draws = [held_out_types(labels, seed) for seed in range(6)]
    assert all(len(d) == 3 and "rare" not in d and d == sorted(d) for d in draws)
    assert draws[0] == held_out_types(labels, 0) and len({tuple(d) for d in draws}) > 1
    with pytest.raises(ValueError, match="20 cells or more"):
        held_out_types(labels[:60], 0)


# ---------------------------------------------------------------------------------------------------- goals, tables
def test_goals_read_one_run_or_means_over_seeds(tmp_path):
    from scmmgpt_train.report import plot_shift_accuracy

    row = lambda ours, theirs: {"scMMGPT (retrieval): accuracy": ours, "scMMGPT (retrieval): macro_f1": ours,
                                "logistic regression (all genes): accuracy": theirs,
                                "logistic regression (all genes): macro_f1": theirs}
    shifts = {"clean": row(0.80, 0.85), "depth 50%": row(0.77, 0.70), "genes 70%": row(0.70, 0.60),
              "batch σ 0.3": row(0.79, 0.80), "combined": row(0.60, 0.50)}
    goals = shift_goals(shifts)
    assert [met for _, met in goals] == [True, True, False, True, True, False, True]
    means = {name: {k: [v, 0.01] for k, v in r.items()} for name, r in shifts.items()}
    assert [met for _, met in shift_goals(means)] == [met for _, met in goals]
    assert "0.770 ± 0.010" in shift_table(means)
    assert plot_shift_accuracy(means, tmp_path / "shifts.png").read_bytes()[:4] == b"\x89PNG"

    unseen = {UNSEEN: {"scMMGPT (retrieval): top-1": 0.55, "scMMGPT (retrieval): top-3": 0.8, "chance: top-1": 0.1,
                       "chance: top-3": 0.3},
              SEEN: {"scMMGPT (retrieval): top-1": 0.76, "scMMGPT (retrieval): top-3": 0.9},
              SEEN_ALL_TYPES: {"scMMGPT (retrieval): top-1": 0.80, "scMMGPT (retrieval): top-3": 0.95}}
    assert [met for _, met in unseen_goals(unseen)] == [True, False]
    assert unseen_table(unseen).count("\n") == 1 + 4

    from scmmgpt_train.report import robustness_sections

    coarse = {"ontology labels: lineages": row(0.87, 0.95)}
    text = "\n".join(robustness_sections({"shifts": shifts, "unseen": unseen, "coarse_labels": coarse}, tmp_path,
                                         {0: ["a", "b", "c"]}))
    assert "## Under dataset shift" in text and "](shifts.png)" in text and "seed 0: a, b, c" in text
    assert "## Coarser ontology labels" in text and "| ontology labels: lineages | 0.870 / 0.870 | 0.950" in text
    assert text.count("**not met**") == 2 + 1 and (tmp_path / "shifts.png").is_file()


def test_seed_summary_averages_shifts_but_tables_them_apart():
    from scmmgpt_train.demo import summarize_seeds

    def results(accuracy):
        return {"annotation": {"scMMGPT (retrieval)": {"accuracy": accuracy, "predictions": np.array(["a"])}},
                "shifts": {"clean": {"scMMGPT (retrieval): accuracy": accuracy}}, "unseen_types": ["a", "b", "c"]}

    summary, table = summarize_seeds({0: results(0.7), 1: results(0.9)})
    assert summary["shifts"]["clean"]["scMMGPT (retrieval): accuracy"] == pytest.approx([0.8, 0.1])
    assert "shifts" not in table and "0.800 ± 0.100" in table
