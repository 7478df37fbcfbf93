"""The `Trainer` pieces every training stage shares: loss-parts logging, a wall-time guard, bounded arguments.

`LossPartsLoggingMixin` goes in front of `transformers.Trainer` or TRL's `SFTTrainer`: each stage's model returns its
loss and the parts it sums (stage 0 `loss_masked_value` / `loss_cell_value`, stage 1 `loss_contrastive` /
`loss_matching` / `loss_captioning`, stage 2 `loss_lm` / `loss_cell_embed` / `loss_expression`), and each part is logged
as its mean over the steps since the last log, next to `loss`.
"""

from __future__ import annotations

import time
import warnings

from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from .config import ConfigError


class QuietLogs(TrainerCallback):
    """Among a trainer's callbacks, asks for no per-log printing: without progress bars `Trainer` prints every log
    dict to stdout (`PrinterCallback`), which `--quiet` runs do not want. The logs still reach `trainer_state.json`
    and the loss plots."""


class LossPartsLoggingMixin:
    """Logs the mean of each loss part next to `loss`. Put it before the trainer class in the bases.

    `loss_parts` (a class attribute, or the `loss_parts=` keyword) names the model output's fields to log; a part that
    is None in a batch (e.g. no text → cell example in it) is left out of that part's mean. A subclass that computes
    its loss itself calls `record_loss_parts` with the parts it made. Every stage's trainer has it, so it is also
    where a `QuietLogs` among the callbacks drops `PrinterCallback`.
    """

    loss_parts: tuple[str, ...] = ()

    def __init__(self, *args, loss_parts=None, **kwargs):
        super().__init__(*args, **kwargs)
        if loss_parts is not None:
            self.loss_parts = tuple(loss_parts)
        if any(isinstance(callback, QuietLogs) for callback in self.callback_handler.callbacks):
            self.remove_callback(PrinterCallback)
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


class ValidationScoreMixin:
    """`evaluate()` scores the model with `validation_score(model) -> {name: value}` (e.g. zero-shot retrieval
    accuracy on validation cells) instead of an eval-loss loop, and logs the scores as `eval_<name>`. With
    `load_best_model_at_end` and `metric_for_best_model: <name>` in the stage's arguments, the run ends on the
    checkpoint that scored best on cells carved from the training data, never on the test split. Put it before the
    trainer class in the bases; without `validation_score` it is the trainer's own `evaluate`."""

    def __init__(self, *args, validation_score=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.validation_score = validation_score

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        if self.validation_score is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        was_training = self.model.training
        metrics = {f"{metric_key_prefix}_{name}": float(value)
                   for name, value in self.validation_score(self.model).items()}
        self.model.train(was_training)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def quiet_libraries():
    """No progress bars from transformers (weight loading, saving) or datasets (reading a built folder's splits): the
    `--quiet` / `--no-progress` of the CLIs that train."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def check_validation(args: TrainingArguments, validation, stage: str):
    """A one-line error when `args` evaluate mid-run (checkpoint choice) but there are no validation cells."""
    if args.eval_strategy not in (None, "no") and validation is None:
        strategy = getattr(args.eval_strategy, "value", args.eval_strategy)  # the YAML's word, not the enum's repr
        raise ConfigError(f"{stage}: eval_strategy={strategy!r} chooses checkpoints on validation cells, but there "
                          "are none: set data.validation_size > 0 (a built folder: build it with --validation-size) "
                          "or eval_strategy: no")


class LossPartsTrainer(ValidationScoreMixin, LossPartsLoggingMixin, Trainer):
    """A `Trainer` that logs the model output's `loss_parts` (the `loss_parts=` keyword) next to `loss`, and scores
    checkpoints with `validation_score=` (see `ValidationScoreMixin`)."""


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


# what every stage's run sets unless its config says otherwise: no checkpoints or evaluation mid-run
RUN_DEFAULTS = dict(logging_first_step=True, save_strategy="no", eval_strategy="no",
                    remove_unused_columns=False,  # the collators read the raw row fields (gene ids, expression, ...)
                    dataloader_num_workers=0)


def bounded_training_arguments(stage_defaults: dict, output_dir, progress: bool = True,
                               **overrides) -> TrainingArguments:
    """`TrainingArguments` for a bounded, checkpoint-free run outside the pipeline: `RUN_DEFAULTS`, then the stage's
    own defaults (e.g. `pretrain.CELL_ENCODER_TRAINING`), then `overrides` (any `TrainingArguments` field)."""
    import torch

    return TrainingArguments(**{**RUN_DEFAULTS, "report_to": "none", "disable_tqdm": not progress, "seed": 0,
                                "dataloader_pin_memory": torch.cuda.is_available(), "output_dir": str(output_dir),
                                **stage_defaults, **overrides})


def stage_training_arguments(args: TrainingArguments | None, stage_defaults: dict, output_dir, progress: bool,
                             overrides: dict) -> TrainingArguments:
    """`args` when given (the pipeline's, parsed from its config section), else `bounded_training_arguments`. The
    two ways are not mixed: `TrainingArguments` fields given beside `args` are an error."""
    if args is None:
        return bounded_training_arguments(stage_defaults, output_dir, progress, **overrides)
    if overrides:
        raise ValueError(f"pass the TrainingArguments fields {sorted(overrides)} inside `args`, not beside it")
    return args


def first_last(log_history: list[dict], key: str) -> tuple[float | None, float | None]:
    """The first and last logged value of `key` in a `Trainer` log history ((None, None) when never logged)."""
    values = [entry[key] for entry in log_history if key in entry]
    return (values[0], values[-1]) if values else (None, None)


def time_guarded(max_seconds: float | None, callbacks=None, progress: bool = True) -> list:
    """`callbacks` with a `TimeLimitCallback(max_seconds)` in front (none when `max_seconds` is None or 0), and a
    `QuietLogs` when `progress` is off: a run without progress bars prints no log dicts either."""
    guards = [TimeLimitCallback(max_seconds)] if max_seconds else []
    return guards + list(callbacks or []) + ([] if progress else [QuietLogs()])


def trained_metrics(trainer: Trainer, result) -> dict:
    """`train_runtime`, `train_steps` and the first / last logged `loss` of a finished `trainer.train()`."""
    first, last = first_last(trainer.state.log_history, "loss")
    return dict(train_runtime=result.metrics["train_runtime"], train_steps=trainer.state.global_step,
                first_loss=first, last_loss=last)


def save_trained(trainer: Trainer, tokenizer, name: str, metrics: dict):
    """The model and `tokenizer` into `trainer.args.output_dir`, then `trainer_state.json` and `{name}_results.json`."""
    trainer.save_model()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(trainer.args.output_dir)
    trainer.save_state()
    trainer.save_metrics(name, metrics)


__all__ = ["RUN_DEFAULTS", "LossPartsLoggingMixin", "LossPartsTrainer", "QuietLogs", "TimeLimitCallback",
           "ValidationScoreMixin", "check_validation", "bounded_training_arguments", "first_last", "save_trained",
           "stage_training_arguments", "time_guarded", "trained_metrics", "quiet_libraries"]
