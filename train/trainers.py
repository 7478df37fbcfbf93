"""The `Trainer` pieces every training stage shares: loss-parts logging, a wall-time guard, bounded arguments.

`LossPartsLoggingMixin` goes in front of `transformers.Trainer` or TRL's `SFTTrainer`: each stage's model returns its
loss and the parts it sums (stage 0 `loss_masked_value` / `loss_cell_value`, stage 1 `loss_contrastive` /
`loss_matching` / `loss_captioning`, stage 2 `loss_lm` / `loss_cell_embed` / `loss_expression`), and each part is logged
as its mean over the steps since the last log, next to `loss`.
"""

from __future__ import annotations

import time
import warnings

from transformers import Trainer, TrainerCallback, TrainingArguments


class LossPartsLoggingMixin:
    """Logs the mean of each loss part next to `loss`. Put it before the trainer class in the bases.

    `loss_parts` (a class attribute, or the `loss_parts=` keyword) names the model output's fields to log; a part that
    is None in a batch (e.g. no text → cell example in it) is left out of that part's mean. A subclass that computes
    its loss itself calls `record_loss_parts` with the parts it made.
    """

    loss_parts: tuple[str, ...] = ()

    def __init__(self, *args, loss_parts=None, **kwargs):
        super().__init__(*args, **kwargs)
        if loss_parts is not None:
            self.loss_parts = tuple(loss_parts)
        self._reset_loss_parts()

    def _reset_loss_parts(self):
        self._part_sums, self._part_counts = {}, {}

    def record_loss_parts(self, parts: dict):
        """Adds one training step's parts (`{name: scalar tensor or None}`) to the running sums."""
        for name, value in parts.items():
            if value is not None:  # kept as tensors: no device sync per step
                self._part_sums[name] = self._part_sums.get(name, 0.0) + value.detach().float()
                self._part_counts[name] = self._part_counts.get(name, 0) + 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.record_loss_parts({name: outputs.get(name) for name in self.loss_parts})
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._part_counts:
            logs.update({name: round(float(self._part_sums[name]) / count, 4)
                         for name, count in self._part_counts.items()})
            self._reset_loss_parts()
        super().log(logs, *args, **kwargs)


class LossPartsTrainer(LossPartsLoggingMixin, Trainer):
    """A `Trainer` that logs the model output's `loss_parts` (the `loss_parts=` keyword) next to `loss`."""


class TimeLimitCallback(TrainerCallback):
    """Stops training once `max_seconds` of wall time have passed since training began (checked after each step), with
    a warning: a run cut short depends on the machine's load (PBMC stage 1 under a concurrent job: 142 of 300 steps,
    and every figure after it fell)."""

    def __init__(self, max_seconds: float):
        self.max_seconds, self.start = float(max_seconds), None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.perf_counter() - self.start >= self.max_seconds:
            control.should_training_stop = True
            if state.max_steps and state.global_step < state.max_steps:
                warnings.warn(f"training stopped by max_seconds={self.max_seconds:g} after {state.global_step} of "
                              f"{state.max_steps} steps: results depend on the machine's load", stacklevel=2)
        return control


def bounded_training_arguments(output_dir, max_steps, batch_size, learning_rate, seed, progress, logging_steps,
                               overrides) -> TrainingArguments:
    """`TrainingArguments` for a bounded, checkpoint-free run; `overrides` (any `TrainingArguments` field) win."""
    import torch

    defaults = dict(
        output_dir=str(output_dir), max_steps=int(max_steps), per_device_train_batch_size=int(batch_size),
        learning_rate=float(learning_rate), warmup_steps=0.05, lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=logging_steps, logging_first_step=True, save_strategy="no", eval_strategy="no",
        report_to="none", seed=int(seed), data_seed=int(seed), disable_tqdm=not progress,
        remove_unused_columns=False,  # the collators read the raw row fields (gene ids, expression, value kind)
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
    )
    return TrainingArguments(**{**defaults, **overrides})


def first_last(log_history: list[dict], key: str) -> tuple[float | None, float | None]:
    """The first and last logged value of `key` in a `Trainer` log history ((None, None) when never logged)."""
    values = [entry[key] for entry in log_history if key in entry]
    return (values[0], values[-1]) if values else (None, None)


__all__ = ["LossPartsLoggingMixin", "LossPartsTrainer", "TimeLimitCallback", "bounded_training_arguments",
           "first_last"]
