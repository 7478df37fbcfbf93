"""Fine-tuned cell type annotation: `ScMMGPTCellForClassification` (pooling, loss, save/load through the Auto classes)
and `finetune_cell_classifier` on the shipped PBMC cells, then `scmmgpt annotate` with the saved folder."""

import json
import warnings

import anndata
import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModelForSequenceClassification

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellForClassification, ScMMGPTCellModel
from modeling_scmmgpt.cli import main
from scmmgpt_train.finetune import classifier_scores, finetune_cell_classifier
from scmmgpt_train.pretrain import pbmc_cells
from scmmgpt_train.streaming import rows_to_cell_inputs

LABELS = ["B", "T", "NK"]


def classifier(pooling: str, **overrides) -> ScMMGPTCellForClassification:
    config = ScMMGPTCellConfig.tiny(vocab_size=50, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                    classifier_pooling=pooling, classifier_dropout=0.0, **overrides)
    torch.manual_seed(0)
    return ScMMGPTCellForClassification(config).eval()


def cells(batch: int = 4, genes: int = 6, padding: int = 0) -> dict:
    """`<cls>` + `genes` gene tokens (ids 2..) with positive values, then `padding` pad tokens."""
    torch.manual_seed(1)
    gene_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.randint(2, 50, (batch, genes)),
                          torch.zeros(batch, padding, dtype=torch.long)], 1)
    values = torch.cat([torch.zeros(batch, 1), torch.rand(batch, genes) * 3 + 0.1, torch.full((batch, padding), -2.0)], 1)
    mask = torch.cat([torch.ones(batch, 1 + genes), torch.zeros(batch, padding)], 1).long()
    return {"gene_ids": gene_ids, "expression_values": values, "attention_mask": mask}


@pytest.mark.parametrize("pooling", ["cls", "mean", "expression_mean"])
def test_logits_loss_and_padding(pooling):
    model = classifier(pooling)
    out = model(**cells(), labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    expected = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(out.loss, expected)
    padded = model(**cells(padding=5)).logits  # padding changes nothing
    torch.testing.assert_close(padded, out.logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="class ids"):
        model(**cells(), labels=torch.tensor([0, 1, 2, 3]))


def test_expression_mean_is_the_expression_weighted_mean_of_input_embeddings():
    model = classifier("expression_mean")
    batch = cells(batch=2, genes=3)
    inputs = model.cell_model.embed_tokens(batch["gene_ids"], batch["expression_values"], batch["attention_mask"])
    weights = batch["expression_values"][:, 1:, None]  # the genes, <cls> left out
    expected = (inputs[:, 1:] * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(model.pooled_cells(**batch), expected)
    # the transformer layers are skipped: changing them changes nothing
    torch.nn.init.normal_(model.cell_model.layers[0].linear1.weight)
    torch.testing.assert_close(model.pooled_cells(**batch), expected)
    with pytest.raises(ValueError, match="classifier_pooling"):
        classifier("max")


@pytest.fixture(scope="module")
def pbmc_split():
    split, tokenizer = pbmc_cells(max_genes=128, test_size=0.2, seed=0)
    return split["train"], split["test"], tokenizer


@pytest.fixture(scope="module")
def trained(pbmc_split, tmp_path_factory):
    """A classifier fine-tuned for 1000 steps (~5 s) from a fresh (untrained) cell encoder folder."""
    train, test, tokenizer = pbmc_split
    encoder_dir = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=len(tokenizer), max_genes=128)).save_pretrained(encoder_dir)
    out = tmp_path_factory.mktemp("classifier")
    model, metrics = finetune_cell_classifier(train, test, tokenizer, str(encoder_dir), output_dir=str(out),
                                              max_steps=1000, progress=False, logging_steps=50)
    return model.eval(), metrics, out


def test_finetuning_on_pbmc_beats_the_majority_class(trained, pbmc_split):
    model, metrics, _ = trained
    train, test, _ = pbmc_split
    types, counts = np.unique(list(test["cell_type"]), return_counts=True)
    majority = counts.max() / counts.sum()
    assert metrics["last_loss"] < metrics["first_loss"] / 3
    # 10 types, top 128 genes, untrained encoder: 0.79 (majority 0.32; logistic regression on all genes 0.88)
    assert metrics["accuracy"] > majority + 0.4, (metrics, majority)
    assert metrics["accuracy"] > metrics["accuracy_before"] + 0.3
    assert set(model.config.id2label.values()) == set(train["cell_type"])


def test_saved_classifier_loads_through_the_auto_classes_and_annotates(trained, pbmc_split):
    model, metrics, folder = trained
    _, test, tokenizer = pbmc_split
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(loaded) is ScMMGPTCellForClassification
    rows = [test[i] for i in range(8)]
    batch = rows_to_cell_inputs(rows, tokenizer)
    args = (batch["gene_ids"], batch["expression_values"], batch["cell_attention_mask"])
    torch.testing.assert_close(loaded(*args).logits, model(*args).logits)
    assert classifier_scores(loaded, test, tokenizer)["accuracy"] == pytest.approx(metrics["accuracy"])
    assert isinstance(AutoFeatureExtractor.from_pretrained(folder), type(tokenizer))


def test_cli_annotates_with_a_classifier_folder(trained, pbmc, tmp_path, capsys):
    model, _, folder = trained
    path, out = tmp_path / "pbmc.h5ad", tmp_path / "annotated.h5ad"
    anndata.AnnData(X=pbmc.raw.X[:30].copy(), obs=pbmc.obs.iloc[:30].copy(), var=pbmc.raw.var.copy()).write_h5ad(path)
    assert main(["annotate", str(folder), str(path), "-o", str(out)]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = anndata.read_h5ad(out)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert list(result.uns["scmmgpt"]["labels"]) == labels and result.uns["scmmgpt"]["method"] == "classifier"
    scores = result.obsm["scmmgpt_cell_type_scores"]
    assert scores.shape == (30, len(labels)) and np.allclose(scores.sum(1), 1.0, atol=1e-5)
    assert list(result.obs["scmmgpt_cell_type"]) == [labels[i] for i in scores.argmax(1)]
    agreement = np.mean(result.obs["scmmgpt_cell_type"].astype(str).values == pbmc.obs["bulk_labels"][:30].astype(str).values)
    assert agreement > 0.6
    capsys.readouterr()
    assert main(["annotate", str(folder), str(path), "-o", str(out), "--labels", "B"]) == 2
    assert "fixed labels" in capsys.readouterr().err
    assert main(["describe", str(folder), str(path), "-o", str(out)]) == 2
    assert "needs a stage2 model; this is a classifier model" in capsys.readouterr().err


def test_checkpoint_is_chosen_on_validation_cells(pbmc_split, tmp_path):
    """With validation cells carved from the training cells, the run scores them every `eval_steps`, keeps the best
    checkpoint and ends on it: the saved model's validation accuracy is the best one logged."""
    train, test, tokenizer = pbmc_split
    carved = train.train_test_split(test_size=0.15, seed=0)
    torch.manual_seed(0)
    ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=len(tokenizer), max_genes=128)).save_pretrained(tmp_path / "e")
    model, _ = finetune_cell_classifier(
        carved["train"], None, tokenizer, str(tmp_path / "e"), output_dir=str(tmp_path / "c"), max_steps=120,
        progress=False, logging_steps=20, validation_rows=carved["test"], eval_strategy="steps", eval_steps=20,
        save_strategy="best", metric_for_best_model="accuracy", load_best_model_at_end=True, learning_rate=3e-2)
    state = json.loads((tmp_path / "c" / "trainer_state.json").read_text())
    logged = [entry["eval_accuracy"] for entry in state["log_history"] if "eval_accuracy" in entry]
    assert len(logged) == 6 and state["best_metric"] == max(logged)
    assert classifier_scores(model.eval(), carved["test"], tokenizer)["accuracy"] == pytest.approx(max(logged))
    with pytest.raises(ValueError, match="no validation cells|there are none"):
        finetune_cell_classifier(carved["train"], None, tokenizer, str(tmp_path / "e"), output_dir=str(tmp_path / "d"),
                                 max_steps=5, progress=False, eval_strategy="steps", eval_steps=2)
