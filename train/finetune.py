"""Fine-tuned cell type annotation: the (aligned) cell encoder + a classification head, trained with `Trainer`.

`finetune_cell_classifier` starts a `ScMMGPTCellForClassification` from any folder that holds a cell encoder (stage 0,
stage 1 or a converted scGPT checkpoint), fine-tunes it with cross-entropy on labelled built rows, scores held-out rows
(accuracy and macro-F1 through `evaluate`) and saves a Hub-ready folder: weights, config with `id2label`, and the cell
tokenizer, which `AutoModelForSequenceClassification` / `AutoFeatureExtractor` load and `scmmgpt annotate` uses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .collators import augmented
from .streaming import cell_input_batches, rows_to_cell_inputs
from .trainers import (LossPartsTrainer, check_validation, save_trained, stage_training_arguments, time_guarded,
                       trained_metrics)

# `TrainingArguments` defaults of a fine-tuning run (its config section, or the keywords of the function, win)
CLASSIFIER_TRAINING = dict(max_steps=1000, per_device_train_batch_size=32, learning_rate=3e-3, logging_steps=50,
                           warmup_steps=0.1, lr_scheduler_type="cosine", weight_decay=0.1)


@dataclass
class CellLabelCollator:
    """Built cell rows → `ScMMGPTCellForClassification.forward` inputs: `gene_ids`, `expression_values`,
    `attention_mask` (B × L) and `labels` (B,), the class id of each row's `label_column` value; `augment`, a
    `CellAugmentation`, changes the cells first."""

    cell_tokenizer: object
    label2id: dict
    label_column: str = "cell_type"
    augment: object = None

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("CellLabelCollator got an empty batch")
        unknown = sorted({str(row[self.label_column]) for row in rows} - set(self.label2id))
        if unknown:
            raise ValueError(f"cell types {unknown} are not among the classifier's labels {sorted(self.label2id)}")
        batch = rows_to_cell_inputs(augmented(self.augment, rows, self.cell_tokenizer), self.cell_tokenizer)
        batch["attention_mask"] = batch.pop("cell_attention_mask")
        batch["labels"] = torch.tensor([self.label2id[str(row[self.label_column])] for row in rows])
        return batch


def load_cell_encoder(encoder_dir: str):
    """The `ScMMGPTCellModel` saved in `encoder_dir`: a cell-encoder folder, or a stage-1 / stage-2 scMMGPT folder,
    whose `cell_model` is taken. Stage 0's folder also holds its pre-training heads, which this drops on purpose, so
    transformers' load report listing them is not printed."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel, ScMMGPTModel

    if not isinstance(AutoConfig.from_pretrained(encoder_dir), ScMMGPTCellConfig):
        return ScMMGPTModel.from_pretrained(encoder_dir).cell_model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return ScMMGPTCellModel.from_pretrained(encoder_dir)
    finally:
        hf_logging.set_verbosity(verbosity)


def classifier_from_encoder(encoder_dir: str, labels: list[str], pooling: str = "expression_mean",
                            dropout: float = 0.1):
    """A `ScMMGPTCellForClassification` whose cell encoder is `load_cell_encoder(encoder_dir)`'s and whose head is
    new."""
    from modeling_scmmgpt import ScMMGPTCellForClassification

    encoder = load_cell_encoder(encoder_dir)
    cell_config = copy.deepcopy(encoder.config)
    cell_config.num_labels = len(labels)
    cell_config.id2label = dict(enumerate(labels))
    cell_config.label2id = {label: i for i, label in enumerate(labels)}
    cell_config.classifier_pooling, cell_config.classifier_dropout = pooling, float(dropout)
    model = ScMMGPTCellForClassification(cell_config)
    model.cell_model.load_state_dict(encoder.state_dict())
    return model


def classifier_scores(model, rows, cell_tokenizer, label_column: str = "cell_type", batch_size: int = 128) -> dict:
    """Accuracy and macro-F1 of the classifier on built rows (through `evaluate`)."""
    from .evaluate import annotation_scores

    model.eval()
    predicted = []
    with torch.inference_mode():
        for batch in cell_input_batches(rows, cell_tokenizer, batch_size, model.device):
            logits = model(batch["gene_ids"], batch["expression_values"], batch["cell_attention_mask"]).logits
            predicted += [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    return annotation_scores([str(label) for label in rows[label_column]], predicted)


def finetune_cell_classifier(train_rows, eval_rows, cell_tokenizer, encoder_dir: str, *, args=None,
                             output_dir: str = "classifier", label_column: str = "cell_type",
                             pooling: str = "expression_mean", dropout: float = 0.1, max_seconds: float | None = None,
                             progress: bool = True, save: bool = True, callbacks=None, augment=None,
                             validation_rows=None, labels=None, **training_args):
    r"""
    Fine-tune a cell type classifier from the cell encoder in `encoder_dir`.

    Args:
        train_rows, eval_rows: built cell rows (`data.build_dataset`) with a `label_column`; `eval_rows` may be None.
            `train_rows` may be streamed (an `IterableDataset`, with `args.max_steps`) when `labels` are given.
        cell_tokenizer: the `ScMMGPTCellTokenizer` of the rows (saved beside the model).
        args: parsed `TrainingArguments` (the pipeline's); without them, `CLASSIFIER_TRAINING` (weight decay 0.1: the
            labelled set is usually small) under `training_args` (any `TrainingArguments` field, e.g. `max_steps`,
            `seed`) with `output_dir` and `progress`. `args.seed` seeds the head's initialisation too.
        pooling, dropout: the head's input (`"expression_mean"`, `"mean"` or `"cls"`, see `ScMMGPTCellForClassification`)
            and its dropout.
        max_seconds: a wall-time guard (warns when it stops training early).
        callbacks: more `TrainerCallback`s.
        augment: a `CellAugmentation` for the training cells.
        validation_rows: labelled cells carved from the training data; with `args.eval_strategy` set, their accuracy
            is logged as `eval_accuracy` and `load_best_model_at_end` keeps the best checkpoint.
        labels: the cell types the head predicts (default: those of `train_rows`, read in memory).

    Returns:
        `(model, metrics)`: the trained model and `{"train_steps", "first_loss", "last_loss", "train_runtime"}` plus,
        with `eval_rows`, held-out `accuracy` / `macro_f1` and those of the untrained head (`*_before`).
    """
    if labels is None and not hasattr(train_rows, "__len__"):
        raise ValueError("fine-tuning a classifier on streamed cells needs their cell types: pass labels=")
    labels = sorted({str(label) for label in (train_rows[label_column] if labels is None else labels)})
    if len(labels) < 2:
        raise ValueError(f"fine-tuning a classifier needs at least 2 cell types in {label_column!r}, got {labels}")
    args = stage_training_arguments(args, CLASSIFIER_TRAINING, output_dir, progress, training_args)
    torch.manual_seed(args.seed)
    model = classifier_from_encoder(encoder_dir, labels, pooling=pooling, dropout=dropout)
    metrics: dict = {}
    if eval_rows is not None:
        metrics.update({f"{k}_before": v for k, v in classifier_scores(model, eval_rows, cell_tokenizer,
                                                                      label_column).items()})
    check_validation(args, validation_rows, "classifier")
    def score(m):
        return classifier_scores(m, validation_rows, cell_tokenizer, label_column)

    trainer = LossPartsTrainer(model=model, args=args, train_dataset=train_rows, eval_dataset=validation_rows,
                               data_collator=CellLabelCollator(cell_tokenizer, model.config.label2id, label_column,
                                                               augment),
                               callbacks=time_guarded(max_seconds, callbacks, progress),
                               validation_score=score if validation_rows is not None else None)
    metrics.update(trained_metrics(trainer, trainer.train()))
    if eval_rows is not None:
        metrics.update(classifier_scores(model, eval_rows, cell_tokenizer, label_column))
    if save:
        save_trained(trainer, cell_tokenizer, "classifier",
                     {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return model, metrics


__all__ = ["CLASSIFIER_TRAINING", "CellLabelCollator", "classifier_from_encoder", "classifier_scores",
           "finetune_cell_classifier", "load_cell_encoder"]
