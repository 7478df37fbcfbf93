"""The resumable training pipeline: every stage of `stages.PIPELINE` in order, each in its own folder.

Each stage writes into its own subfolder of the output folder and marks it complete (`COMPLETE.json`) after its save; a
re-run skips complete stages (unless `fresh`), and a stage that was interrupted resumes from its last checkpoint
(`resume_from_checkpoint`). Under several processes (torchrun / accelerate) the main process writes the shared files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from transformers import TrainerCallback

from .config import STAGES, ConfigError, DataArguments, PipelineConfig, load_config
from .stages import PIPELINE, Stage, StageRun, how_to_provide
from .trainers import check_validation, time_guarded

MARKER = "COMPLETE.json"


# -------------------------------------------------------------------------------------------- processes, markers
def _state():
    import torch
    from accelerate import PartialState

    # `cpu=True` where there is no GPU: accelerate then forms a gloo group under torchrun (MULTI_CPU) instead of
    # running every process alone; the state is shared, so the Trainers see the same
    return PartialState(cpu=not torch.cuda.is_available())


def _warn_unsharded():
    """accelerate (1.x) turns FSDP on for GPU-type devices only: under `accelerate launch --config_file
    train/accelerate/fsdp.yaml` without GPUs its state stays MULTI_CPU, the FSDP settings are dropped and the Trainer
    wraps the model in plain DDP. Same weights (DDP and FSDP train alike), but nothing is sharded: say so."""
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and _state().num_processes > 1
            and is_main_process()):
        from accelerate.utils import DistributedType

        if _state().distributed_type == DistributedType.MULTI_CPU:
            warnings.warn("FSDP was asked for (ACCELERATE_USE_FSDP), but accelerate shards on GPUs only: these CPU "
                          "processes train as plain DDP, every one holding the whole model", stacklevel=3)


def is_main_process() -> bool:
    """Whether this is the main process (the only one under a single-process run)."""
    return _state().is_main_process


def _barrier():
    _state().wait_for_everyone()


def is_complete(stage_dir) -> bool:
    """Whether a stage folder holds a finished stage (its marker is written after everything else)."""
    return (Path(stage_dir) / MARKER).is_file()


def _read_marker(stage_dir) -> dict:
    return json.loads((Path(stage_dir) / MARKER).read_text())


def _write_marker(stage_dir, record: dict):
    if is_main_process():
        path = Path(stage_dir) / MARKER
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=float))
        os.replace(tmp, path)  # atomic: a killed write leaves no marker
    _barrier()


def _last_checkpoint(stage_dir) -> str | None:
    """The newest complete checkpoint of a stage. `Trainer` writes `trainer_state.json` last and not atomically, so a
    run killed while saving leaves a checkpoint folder without it; that one is passed over (unlike
    `transformers.trainer_utils.get_last_checkpoint`)."""
    import re

    if not Path(stage_dir).is_dir():
        return None
    found = [(int(m.group(1)), p) for p in Path(stage_dir).iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
    return None


def _finish_stage(name: str, stage_dir: Path, log_history: list[dict], metrics: dict, started: float) -> dict:
    """Loss-curve PNG, trainer_state.json (already written by the trainer), then the marker."""
    from .plots import first_last_losses, plot_losses

    plot = plot_losses(log_history, stage_dir / "loss_curve.png", title=name) if is_main_process() else None
    record = {"stage": name, "dir": str(stage_dir), "metrics": metrics, "losses": first_last_losses(log_history),
              "plot": str(stage_dir / "loss_curve.png") if plot or not is_main_process() else None,
              "trainer_state": str(stage_dir / "trainer_state.json"), "seconds": time.perf_counter() - started}
    _write_marker(stage_dir, record)
    return record


def _time_limit(seconds):
    """`seconds` as a wall-time stop for single-process runs, else None: with several processes each would stop at its
    own step and the collective ops would hang."""
    if not seconds:
        return None
    if _state().num_processes > 1:
        warnings.warn("max_seconds is ignored with several processes (ranks must stop at the same step)", stacklevel=2)
        return None
    return seconds


class RankStepsCallback(TrainerCallback):
    """Writes `ranks/rank-{i}.json` (process index, world size, optimizer steps this process took, accelerate's
    `distributed_type`: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED) at train end, so a distributed run can be checked
    to have stepped on every rank, the way it was launched."""

    def __init__(self, folder):
        self.folder, self.steps = Path(folder), 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        out = self.folder / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        from accelerate.state import AcceleratorState

        (out / f"rank-{args.process_index}.json").write_text(json.dumps(
            {"process_index": args.process_index, "world_size": args.world_size, "steps": self.steps,
             "global_step": state.global_step, "distributed_type": str(AcceleratorState().distributed_type.value)}))


# ---------------------------------------------------------------------------------------------------- data
class Cells(NamedTuple):
    """A run's cells: `train` a `datasets.Dataset` (or a per-rank `IterableDataset` for a built folder), `test` held-out
    rows (or None), `all_rows` the in-memory cells used as the k-NN reference (or None), their `tokenizer`, and
    `unseen` the cells of `data.held_out_cell_types` (or None), which no stage trains on, and `validation` cells
    carved from the training split (`data.validation_size`; or None) on which stages choose their checkpoint."""

    train: Any
    test: Any
    all_rows: Any
    tokenizer: Any
    unseen: Any = None
    validation: Any = None


def load_cells(data: DataArguments) -> Cells:
    """The cells of the `data` section (see `Cells`; unpacks as `train, test, all_rows, cell_tokenizer, unseen,
    validation`)."""
    from .data import build_dataset, load_cell_tokenizer, load_dataset_dir, read_build_info
    from .pretrain import pbmc_path
    from .sources import DataError, OptionError
    from .splits import split_dataset
    from .streaming import stream_dataset

    if data.dataset_dir:
        try:
            shards = read_build_info(data.dataset_dir).get("shards", {})
        except DataError as error:  # a wrong path: said as the config's mistake, not as a loader's traceback
            raise ConfigError(f"data.dataset_dir: {error}") from None
        tokenizer = load_cell_tokenizer(data.dataset_dir)
        tokenizer.max_genes = data.max_genes
        # not split here: under several processes the Trainer's accelerator gives each rank its share of the stream
        # (`IterableDataset.shard`: whole parquet shards per rank, the split `stream_dataset(rank=, world_size=)`
        # makes, when there are at least as many shards as ranks); splitting here too would drop data
        train = stream_dataset(data.dataset_dir, "train", seed=data.seed, buffer_size=data.stream_buffer_size)
        if data.validation_size and "validation" not in shards:
            raise ConfigError("data.validation_size: a built folder streams its training cells, so its validation "
                              "cells are set aside when it is built: pass --validation-size to scmmgpt build-dataset, "
                              "or set data.validation_size: 0")
        if data.held_out_cell_types:
            raise ConfigError("data.held_out_cell_types splits an in-memory h5ad; a built folder was split when it was "
                              "built: pass --held-out-cell-types to scmmgpt build-dataset")
        test, unseen, validation = (load_dataset_dir(data.dataset_dir, split) if split in shards else None
                                    for split in ("test", "heldout", "validation"))
        return Cells(train, test, test, tokenizer, unseen, validation)
    source = data.h5ad or pbmc_path()
    try:
        dataset, tokenizer = build_dataset(source, return_tokenizer=True, label_column=data.label_column)
        splits = split_dataset(dataset, by=data.split_by, test_size=data.test_size, seed=data.seed,
                               held_out_cell_types=data.held_out_cell_types)
    except OptionError as error:  # label_column, split_by, test_size, held_out_cell_types: the data section's options
        raise ConfigError(f"data.{error.option} {error.problem}") from None
    except DataError as error:
        raise ConfigError(f"data.h5ad: {error}") from None
    tokenizer.max_genes = data.max_genes
    train, validation = splits["train"], None
    if data.validation_size:
        # a random carve, not per type as a built folder's: per type cost make eval's retrieval 4.5 points
        # (BENCHMARKS.md, issue #16)
        carved = train.train_test_split(test_size=data.validation_size, seed=data.seed)
        train, validation = carved["train"], carved["test"]
    return Cells(train, splits.get("test"), dataset, tokenizer, splits.get("heldout"), validation)


# ---------------------------------------------------------------------------------------------------- pipeline
def run_pipeline(config, output_dir=None, fresh: bool = False, progress: bool = True, stages=None,
                 overrides: dict | None = None) -> dict:
    """Run every stage of `config` on its data, each cached in `output_dir/<stage>/`.

    Args:
        config: a YAML path, its dict, or a `PipelineConfig`.
        output_dir: the run's folder (default: the config's `pipeline.output_dir`).
        fresh: retrain every stage (their folders are removed first).
        progress: Trainer progress bars.
        stages: the stages to run (default: the config's `pipeline.stages`); complete stages are reused either way.
        overrides: `{"section.key": value}` on top of the config.

    Returns:
        dict with `output_dir`, `model_dir` (the final Hub-ready folder, or None without stage 2), `seconds` (this
        call), and `stages`: `{stage: {"dir", "cached", "seconds", "plot", "trainer_state", "metrics", "losses":
        {loss name: [first, last]}}}`, plus `losses` (`{stage: {loss: [first, last]}}`), `plots` (`{stage: png}`)
        and `metrics` (`{stage: metrics}`) for the stages that ran or were cached.
    """
    started = time.perf_counter()
    _warn_unsharded()
    if isinstance(config, PipelineConfig):
        config = config.raw if output_dir is not None or overrides else config
    cfg = config if isinstance(config, PipelineConfig) else load_config(config, output_dir, overrides)
    root = Path(cfg.pipeline.output_dir)
    wanted = list(stages or cfg.pipeline.stages)
    model_dir = root / "model"
    cells = load_cells(cfg.data)  # data mistakes, and stages that lack validation cells, before anything is written
    _check_validation_cells(cfg, cells, [s for s in PIPELINE
                                         if s.name in wanted and (fresh or not is_complete(root / s.name))])
    if fresh and is_main_process():
        for path in [*(root / stage.name for stage in PIPELINE), model_dir]:
            shutil.rmtree(path, ignore_errors=True)
    _barrier()
    root.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    inputs: dict[str, Path | str] = {}
    for stage in PIPELINE:
        given = getattr(cfg.model, stage.given_by) if stage.given_by else None
        if given:  # the config names a folder: the stage that would make it is not needed
            inputs[stage.provides] = given
            continue
        folder = root / stage.name
        if is_complete(folder):
            results[stage.name] = {**_read_marker(folder), "cached": True}
        elif stage.name in wanted:
            _check_needs(stage, inputs)
            run = StageRun(config=cfg, folder=folder, cells=cells, inputs=dict(inputs), model_dir=model_dir)
            results[stage.name] = {**_run_stage(stage, run, progress), "cached": False}
        if stage.name in results:
            inputs[stage.provides] = folder

    complete = {name: is_complete(root / name) for name in STAGES}
    return {
        "output_dir": str(root),
        "model_dir": str(model_dir) if complete["stage2"] else None,
        "classifier_dir": str(root / "classifier") if complete["classifier"] else None,
        "seconds": time.perf_counter() - started,
        "stages": results,
        "losses": {name: r["losses"] for name, r in results.items()},
        "plots": {name: r["plot"] for name, r in results.items() if r.get("plot")},
        "metrics": {name: r["metrics"] for name, r in results.items()},
    }


def _check_needs(stage: Stage, inputs: dict):
    """A one-line error naming what `stage` lacks and how to provide it."""
    missing = [need for need in stage.needs if need not in inputs]
    if not missing:
        return
    providers = {other.provides: other for other in PIPELINE}
    raise ConfigError(f"{stage.name} needs the output of {' and '.join(providers[n].name for n in missing)}: "
                      + "; ".join(how_to_provide(need) for need in missing))


def _check_validation_cells(cfg: PipelineConfig, cells: Cells, to_train: list[Stage]):
    """Before any stage trains: a one-line error when a stage to train chooses its checkpoint on validation cells
    and the run has none (rather than after the stages before it)."""
    for stage in to_train:
        if stage.validates:
            check_validation(cfg.training(stage.name)[0], cells.validation, stage.name)


def _run_stage(stage: Stage, run: StageRun, progress: bool) -> dict:
    """Train one stage with its parsed arguments, then its loss plot and marker."""
    started = time.perf_counter()
    run.folder.mkdir(parents=True, exist_ok=True)
    args, extra = run.config.training(stage.name)
    args.disable_tqdm = args.disable_tqdm or not progress
    # without progress: no bars, and no log dict printed at every logging step either
    run.callbacks = time_guarded(_time_limit(extra.max_seconds), [RankStepsCallback(run.folder)], progress)
    run.resume_from_checkpoint = _last_checkpoint(run.folder)
    metrics = stage.train(run, args, extra)
    _barrier()  # the main process writes trainer_state.json
    log_history = json.loads((run.folder / "trainer_state.json").read_text())["log_history"]
    return _finish_stage(stage.name, run.folder, log_history, metrics, started)


__all__ = ["Cells", "MARKER", "RankStepsCallback", "is_complete", "is_main_process", "load_cells", "run_pipeline"]
