"""Evaluation metrics (offline `evaluate` modules) and baselines on the real PBMC cells."""

import json

import numpy as np
import pytest

from scmmgpt_train.data import build_dataset
from scmmgpt_train.evaluate import (
    TYPE_MEAN_REFERENCE,
    EvalCells,
    annotation_baselines,
    annotation_scores,
    description_scores,
    evaluate_model,
    evaluate_pseudo_cells,
    fit_pca,
    nearest_cell_descriptions,
    noisy_mean_cells,
    pseudo_cell_scores,
    real_cell_draws,
    results_table,
)
from scmmgpt_train.splits import split_dataset
from scmmgpt_train.stage1 import label_texts_of


@pytest.fixture(scope="module")
def pbmc_split(pbmc_path):
    dataset, tokenizer = build_dataset(pbmc_path, return_tokenizer=True, label_column="bulk_labels")
    splits = split_dataset(dataset, by="cell", test_size=0.3, seed=0)
    train, test = (EvalCells.from_rows(splits[s], tokenizer) for s in ("train", "test"))
    return train, test, tokenizer, label_texts_of(dataset)


def test_metric_values_on_hand_examples():
    assert annotation_scores(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx(
        {"accuracy": 0.75, "macro_f1": (2 / 3 + 0.8) / 2})
    same = description_scores(["cell type: monocyte. A cell."], ["cell type: monocyte. A cell."])
    assert all(same[k] == pytest.approx(1.0, abs=1e-3) for k in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL"))
    assert same["meteor"] > 0.9
    disjoint = description_scores(["alpha beta gamma"], ["delta epsilon zeta"])
    assert disjoint["bleu2"] == 0 and disjoint["rouge1"] == 0 and disjoint["meteor"] == 0


def test_baselines_on_pbmc(pbmc_split):
    train, test, _, _ = pbmc_split
    assert train.matrix.shape[1] == 765 and (train.matrix >= 0).all()
    pca = fit_pca(train)
    scores = {name: annotation_scores(test.labels, pred)["accuracy"]
              for name, pred in annotation_baselines(train, test, pca).items()}
    print(scores)
    assert scores["majority class"] == pytest.approx(np.mean(test.labels == "Dendritic"))
    assert scores["logistic regression (PCA)"] > 0.75 > scores["majority class"]
    # nearest-cell descriptions copy a real cell's text: right as often as 1-NN annotation
    texts = nearest_cell_descriptions(train, test, pca)
    assert len(texts) == len(test.labels) and set(texts) <= set(train.texts)


def test_pseudo_cell_scores_rank_real_cells_above_noise(pbmc_split):
    train, test, _, label_texts = pbmc_split
    pca = fit_pca(train)
    types = list(label_texts)
    real, real_labels = real_cell_draws(train, types, 20)  # real training cells as "generated"
    assert len(real) == len(real_labels) <= 20 * len(types) and set(real_labels) == set(types)
    real_like = pseudo_cell_scores(test, real, real_labels, pca)
    noisy, noisy_labels = noisy_mean_cells(train, types, 20, noise=1.0)
    noisy_scores = pseudo_cell_scores(test, noisy, noisy_labels, pca)
    scrambled = pseudo_cell_scores(test, noisy, np.random.default_rng(0).permutation(noisy_labels), pca)
    print(real_like["knn_accuracy"], noisy_scores["knn_accuracy"], scrambled["knn_accuracy"])
    assert real_like["knn_accuracy"] > 0.6 and real_like["mean_correlation"] > 0.85
    assert real_like["knn_accuracy"] > noisy_scores["knn_accuracy"] - 0.1
    centres, centre_labels = noisy_mean_cells(train, types, 1, noise=0.0)  # the types' mean expression
    centre_scores = pseudo_cell_scores(test, centres, centre_labels, pca)
    assert centres.shape == (len(types), 765) and centre_scores["knn_accuracy"] >= real_like["knn_accuracy"]
    assert scrambled["knn_accuracy"] < noisy_scores["knn_accuracy"]


def test_evaluate_model_end_to_end_on_a_tiny_model(pbmc_split, minilm_tokenizer):
    import copy

    import torch

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor

    from .test_multimodal import tiny_config

    train, test, cell_tokenizer, label_texts = pbmc_split
    processor = ScMMGPTProcessor(cell_tokenizer, copy.deepcopy(minilm_tokenizer), num_query_tokens=4)
    torch.manual_seed(0)
    model = ScMMGPTForConditionalGeneration(tiny_config(len(cell_tokenizer), len(processor.tokenizer))).eval()
    model.set_cell_token_ids(processor)
    small = EvalCells(test.matrix[:12], test.labels[:12], test.texts[:12], test.gene_names)
    results = evaluate_model(model, processor, train, small, label_texts, n_per_type=2, describe_cells=3,
                             progress=False)
    assert set(results["annotation"]) >= {"scMMGPT (retrieval)", "scMMGPT (likelihood)", "scMMGPT (generate)",
                                          "logistic regression (PCA)"}
    assert len(results["description"]["scMMGPT"]["texts"]) == 3
    assert results["pseudo_cells"]["scMMGPT"]["expression"].shape == (20, 765)
    table = results_table(results)
    assert results["pseudo_cells"]["real training cells"]["expression"].shape[1] == 765
    assert results["pseudo_cells"][TYPE_MEAN_REFERENCE]["expression"].shape == (len(label_texts), 765)
    # 12 held-out cells: too few of any type to score its distribution, flagged, NaN figures
    model = results["pseudo_cells"]["scMMGPT"]
    assert sorted(model["types_too_few_cells"]) == sorted(label_texts) and np.isnan(model["energy_distance"])
    assert 0 <= model["classifier_accuracy"] <= 1 and model["types scored"] == 0
    # annotation (7 rows) and description (2) under one header, then the pseudo-cell table (7 rows)
    assert table.count("\n") == (2 + 7 + 2 - 1) + 2 + (2 + 7 - 1) and "k-NN vote (rewards type centres)" in table


def test_seed_summary_is_mean_and_sd_of_each_figure():
    from scmmgpt_train.demo import summarize_seeds

    def results(accuracy, knn):
        return {"annotation": {"scMMGPT (retrieval)": {"accuracy": accuracy, "predictions": np.array(["a"])}},
                "description": {}, "pseudo_cells": {"scMMGPT": {"knn_accuracy": knn, "labels": np.array(["a"])}}}

    summary, table = summarize_seeds({0: results(0.7, 0.5), 1: results(0.9, 0.7), 2: results(0.8, 0.6)})
    assert summary["annotation"]["scMMGPT (retrieval)"]["accuracy"] == pytest.approx([0.8, np.std([0.7, 0.9, 0.8])])
    assert summary["pseudo_cells"]["scMMGPT"]["knn_accuracy"][0] == pytest.approx(0.6)
    assert "0.800 ± 0.082" in table and "seeds 0, 1, 2" in table


def test_report_writes_table_figures_and_examples(pbmc_split, tmp_path):
    from scmmgpt_train.report import training_steps, write_report

    train, test, _, label_texts = pbmc_split
    pca = fit_pca(train)
    types = list(label_texts)
    predicted = annotation_baselines(train, test, pca)["logistic regression (PCA)"]
    generated = {"scMMGPT": noisy_mean_cells(train, types, 5, noise=0.2)}
    results = {
        "annotation": {"scMMGPT (retrieval)": {**annotation_scores(test.labels, predicted), "predictions": predicted}},
        "description": {"scMMGPT": {**description_scores(test.texts, test.texts), "texts": test.texts}},
        "pseudo_cells": evaluate_pseudo_cells(train, test, types, generated, pca, n_per_type=5),
    }
    for stage, (run, planned) in {"stage1": (300, 300), "stage2": (158, 600)}.items():
        (tmp_path / f"{stage}.json").write_text(json.dumps({"global_step": run, "max_steps": planned}))
    steps = training_steps({stage: {"trainer_state": str(tmp_path / f"{stage}.json")} for stage in ("stage1", "stage2")})
    assert steps == {"stage1": (300, 300), "stage2": (158, 600)}
    report = write_report(results, test, tmp_path, types, timings={"training": 1.0}, n_examples=3, steps=steps)
    text = report.read_text()
    assert "| stage1 | 300 / 300 |" in text and "| stage2 | 158 / 600 (cut short by max_seconds) |" in text
    assert "| annotation | scMMGPT (retrieval) |" in text and "](confusion_matrix.png)" in text and "](umap.png)" in text
    assert "| per-type negative binomial |" in text and "Goals (issue 17):" in text and "](marker_genes.png)" in text
    assert text.count(test.texts[0][:60]) >= 2  # an example description beside its reference
    for png in ("confusion_matrix.png", "umap.png", "marker_genes.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
