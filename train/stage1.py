"""Stage 1 (cell–text alignment) with `transformers.Trainer`: building the model, training, zero-shot retrieval.

The three losses (contrastive, matching, captioning) are logged separately beside their sum.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import BertConfig

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTConfig, ScMMGPTModel
from modeling_scmmgpt.processing_scmmgpt import qformer_text_inputs

from .collators import Stage1Collator
from .streaming import cell_input_batches
from .trainers import LossPartsTrainer, check_validation

STAGE1_LOSSES = ("loss_contrastive", "loss_matching", "loss_captioning")


# the Q-Former of a preset when no BERT folder gives one (over BertConfig's defaults): the tiny pipeline's 64-wide
# 2-layer BERT (wider than ScMMGPTConfig.tiny()'s 32-wide test Q-Former), and for the paper BERT-base itself
RANDOM_QFORMER = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
    "paper": {},
}


def stage1_config(cell_tokenizer, text_tokenizer, preset: str = "tiny", qformer_path: str | None = None,
                  cell_config: dict | None = None, qformer_config: dict | None = None,
                  **config_overrides) -> ScMMGPTConfig:
    """The stage-1 model's config: `ScMMGPTConfig.<preset>` (`"tiny"` or `"paper"`) with its cell encoder updated by
    `cell_config` and sized to the cell tokenizer (vocabulary, genes per cell), its Q-Former from the BERT folder or
    Hub id `qformer_path` (config only: no weights are read) or else the preset's random one updated by
    `qformer_config`, its Q-Former vocabulary at least the text tokenizer's; `config_overrides` are the model
    config's own fields (`num_query_tokens`, `embed_dim`, ...)."""
    preset_cell = ScMMGPTConfig.from_preset(preset).cell_config.to_dict()
    cell = ScMMGPTCellConfig(**{**preset_cell, **(cell_config or {}), "vocab_size": len(cell_tokenizer),
                                "max_genes": cell_tokenizer.max_genes})
    if qformer_path is not None:
        bert = BertConfig.from_pretrained(qformer_path).to_dict()
    else:
        bert = {"model_type": "bert", **RANDOM_QFORMER[preset], **(qformer_config or {})}
    bert["vocab_size"] = max(len(text_tokenizer), bert.get("vocab_size", 0))
    return ScMMGPTConfig.from_preset(preset, cell_config=cell, qformer_config=bert, **config_overrides)


def build_stage1_model(cell_tokenizer, text_tokenizer, qformer_path: str | None = None, cell_config: dict | None = None,
                       qformer_config: dict | None = None, preset: str = "tiny", **config_overrides) -> ScMMGPTModel:
    """A stage-1 model built from `stage1_config` (same arguments). With `qformer_path` (a BERT folder or Hub id), the
    Q-Former takes that BERT's shape and weights; otherwise it is randomly initialised."""
    config = stage1_config(cell_tokenizer, text_tokenizer, preset=preset, qformer_path=qformer_path,
                           cell_config=cell_config, qformer_config=qformer_config, **config_overrides)
    model = ScMMGPTModel(config)
    if qformer_path is not None:
        model.load_qformer_from_bert(qformer_path)
    return model


class Stage1Trainer(LossPartsTrainer):
    """`Trainer` that also logs each stage-1 loss (mean over the steps since the last log)."""

    loss_parts = STAGE1_LOSSES


def stage1_collator(cell_tokenizer, text_tokenizer, max_text_length: int = 128, augment=None, seed: int = 0,
                    **texts) -> Stage1Collator:
    """`Stage1Collator`; `texts`: its text options (`text_variants`, `expressed_genes` and their probabilities)."""
    return Stage1Collator(cell_tokenizer=cell_tokenizer, text_tokenizer=text_tokenizer, max_text_length=max_text_length,
                          augment=augment, seed=seed, **texts)


def label_texts_of(dataset) -> dict[str, str]:
    """label → its text (`"cell type: X. <definition>"`), from a built dataset's `cell_type` / `text` columns."""
    pairs = {}
    for label, text in zip(dataset["cell_type"], dataset["text"]):
        pairs.setdefault(label, text)
    return pairs


def gene_vocab(model, cell_tokenizer) -> dict | None:
    """The cell vocabulary the model's texts name genes from (`text_gene_grounding`), else None: no gene ids."""
    return cell_tokenizer.vocab if model.config.text_gene_grounding else None


@torch.inference_mode()
def retrieval_predictions(model, rows, cell_tokenizer, text_tokenizer, label_texts: dict[str, str],
                          batch_size: int = 64) -> tuple[list[str], np.ndarray]:
    """Zero-shot annotation of built rows by cell–text retrieval: (predicted labels, scores cells × labels)."""
    model.eval()
    labels = list(label_texts)
    text = qformer_text_inputs(text_tokenizer, [label_texts[label] for label in labels], model.config.max_text_length,
                               gene_vocab(model, cell_tokenizer))
    text_features = model.get_text_features(**{k: v.to(model.device) for k, v in text.items()})
    scores = torch.cat([(model.get_cell_features(**batch) @ text_features.T).float().cpu()
                        for batch in cell_input_batches(rows, cell_tokenizer, batch_size, model.device)]).numpy()
    return [labels[i] for i in scores.argmax(1)], scores


def retrieval_accuracy(model, rows, cell_tokenizer, text_tokenizer, label_texts: dict[str, str]) -> float:
    predictions, _ = retrieval_predictions(model, rows, cell_tokenizer, text_tokenizer, label_texts)
    return float(np.mean(np.asarray(predictions) == np.asarray(rows["cell_type"])))


def train_stage1(model: ScMMGPTModel, train_dataset, cell_tokenizer, text_tokenizer, args, *, eval_dataset=None,
                 label_texts: dict[str, str] | None = None, freeze_cell_encoder: bool = False,
                 max_text_length: int = 128, callbacks=None, resume_from_checkpoint=None, augment=None,
                 validation_dataset=None, texts: dict | None = None):
    """Stage 1 with `Stage1Trainer` (`args`: `TrainingArguments`). With `eval_dataset` and `label_texts`, zero-shot
    retrieval accuracy on it is measured before and after training. `freeze_cell_encoder` keeps the cell encoder's
    weights (e.g. a pre-trained scGPT) fixed and trains the Q-Former and heads only. With `validation_dataset` (cells
    carved from the training data) and `args.eval_strategy` set, retrieval accuracy on it is logged as
    `eval_retrieval_accuracy` and `load_best_model_at_end` keeps the best checkpoint. `texts`: the collator's text
    options (`Stage1Collator`: `text_variants`, `expressed_genes` and their probabilities).

    Returns:
        `(trainer, metrics)`; metrics hold `train_runtime`, `train_steps` and, with evaluation data,
        `retrieval_accuracy_before` / `retrieval_accuracy`.
    """
    model.cell_model.requires_grad_(not freeze_cell_encoder)
    metrics: dict = {}
    evaluate = eval_dataset is not None and label_texts
    if evaluate:
        metrics["retrieval_accuracy_before"] = retrieval_accuracy(model, eval_dataset, cell_tokenizer, text_tokenizer,
                                                                  label_texts)
    check_validation(args, validation_dataset, "stage1")
    def score(m):
        return {"retrieval_accuracy": retrieval_accuracy(m, validation_dataset, cell_tokenizer, text_tokenizer,
                                                         label_texts)}

    trainer = Stage1Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=callbacks,
                            data_collator=stage1_collator(
                                cell_tokenizer, text_tokenizer, max_text_length, augment, args.seed,
                                gene_vocab=gene_vocab(model, cell_tokenizer),
                                **(texts or {})),
                            eval_dataset=validation_dataset,
                            validation_score=score if validation_dataset is not None and label_texts else None)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics.update(train_runtime=result.metrics["train_runtime"], train_steps=trainer.state.global_step)
    if evaluate:
        metrics["retrieval_accuracy"] = retrieval_accuracy(trainer.model, eval_dataset, cell_tokenizer,
                                                           text_tokenizer, label_texts)
    return trainer, metrics


__all__ = ["RANDOM_QFORMER", "STAGE1_LOSSES", "Stage1Trainer", "build_stage1_model", "label_texts_of",
           "retrieval_accuracy", "retrieval_predictions", "stage1_collator", "stage1_config", "train_stage1"]
