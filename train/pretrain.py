"""Stage 0: single-modal pre-training of the parts the paper takes pre-trained, for when they are not at hand.

- `pretrain_cell_encoder`: the cell encoder with scGPT's objectives (masked value prediction on gene tokens and value
  prediction from the cell embedding, `ScMMGPTCellForMaskedValuePrediction`) through `transformers.Trainer`, on
  built cell rows (`data.build_dataset`; the shipped PBMC cells by default). `masked_value_mse` scores an encoder on
  held-out cells under a fixed, seeded mask, so a trained and a random encoder are compared on the same hidden values.
- `pretrain_small_llm`: a byte-level BPE tokenizer trained with `tokenizers` on the corpus text (Cell Ontology names
  and definitions, and the cells' texts), wrapped as a `PreTrainedTokenizerFast`, and a small `LlamaForCausalLM`
  pre-trained on it with `Trainer`; `perplexity` scores it on held-out definitions.

Both default to a tiny CPU budget (about 1-2 and 2-3 minutes on 2 cores: 200 and 150 steps), bounded by `max_steps` and `max_seconds`.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .ontology import cell_type_text, ontology_texts
from .collators import augmented
from .streaming import rows_to_cell_inputs
from .trainers import LossPartsTrainer, save_trained, stage_training_arguments, time_guarded, trained_metrics

TEXT_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")  # bos, eos, pad, unk of the trained text tokenizer
CELL_LOSS_PARTS = ("loss_masked_value", "loss_cell_value")
# `TrainingArguments` defaults of each stage-0 run (its config section, or the keywords of the function, win)
CELL_ENCODER_TRAINING = dict(max_steps=200, per_device_train_batch_size=32, learning_rate=3e-3, logging_steps=10,
                             warmup_steps=0.05, lr_scheduler_type="cosine", weight_decay=0.01)
SMALL_LLM_TRAINING = dict(CELL_ENCODER_TRAINING, max_steps=150, per_device_train_batch_size=16, learning_rate=2e-3,
                          logging_steps=20)


# ------------------------------------------------------------------------------------------------ cells
def pbmc_path() -> str:
    """scanpy's shipped `10x_pbmc68k_reduced.h5ad` (700 PBMCs; `.raw` holds 765 log-normalised genes)."""
    import scanpy

    return os.path.join(os.path.dirname(scanpy.__file__), "datasets", "10x_pbmc68k_reduced.h5ad")


def pbmc_cells(max_genes: int = 256, test_size: float = 0.1, seed: int = 0):
    """The shipped PBMC cells as built rows, split into `"train"` / `"test"` by a seeded shuffle, and their tokenizer.

    The tokenizer's vocabulary is the file's `.raw` genes; `.raw` is already log-normalised, so `normalize=False`.

    Returns:
        (`datasets.DatasetDict` with `"train"` and `"test"` rows of `data.cell_features()`, `ScMMGPTCellTokenizer`).
    """
    import anndata

    from modeling_scmmgpt import ScMMGPTCellTokenizer

    from .data import build_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's legacy-format notices on the shipped file
        adata = anndata.read_h5ad(pbmc_path())
    tokenizer = ScMMGPTCellTokenizer(gene_names=list(adata.raw.var_names), max_genes=max_genes, normalize=False)
    cells = build_dataset(adata, tokenizer, value_kind="log1p_normalized")
    return cells.train_test_split(test_size=test_size, seed=seed), tokenizer


@dataclass
class MaskedValueCollator:
    r"""
    Built cell rows → `ScMMGPTCellForMaskedValuePrediction.forward` inputs.

    Masks are not drawn here: the model draws them in `forward` from the global RNG, which `Trainer` seeds and saves in
    its checkpoints, so a resumed run masks as an uninterrupted one would.

    `augment`, a `CellAugmentation`, changes the cells first (the values to predict are the augmented ones).

    Returns (torch tensors): `gene_ids` (B × L int64), `expression_values` (B × L float32, the true values),
    `attention_mask` (B × L int64).
    """

    cell_tokenizer: object
    augment: object = None

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("MaskedValueCollator got an empty batch")
        batch = rows_to_cell_inputs(augmented(self.augment, rows, self.cell_tokenizer), self.cell_tokenizer)
        batch["attention_mask"] = batch.pop("cell_attention_mask")
        return batch


def fixed_mask_batch(cells, cell_tokenizer, mask_ratio: float, seed: int = 0, config=None) -> dict:
    """All of `cells` tokenised as one padded batch, with `masked_positions` drawn once from `seed`.

    The mask depends on the cells and the seed only (not on a batch size or a model), so every model scored on it
    predicts the same hidden values.
    """
    import torch

    from modeling_scmmgpt.modeling_cell_pretraining import random_mask_positions

    rows = [cells[i] for i in range(len(cells))]
    batch = MaskedValueCollator(cell_tokenizer)(rows)
    if config is None:
        from modeling_scmmgpt import ScMMGPTCellConfig

        config = ScMMGPTCellConfig(pad_token_id=cell_tokenizer.pad_token_id, cls_token_id=cell_tokenizer.cls_token_id)
    generator = torch.Generator().manual_seed(int(seed))
    batch["masked_positions"] = random_mask_positions(
        batch["gene_ids"], batch["attention_mask"], config, mask_ratio, generator
    )
    return batch


def masked_value_mse(model, cells, cell_tokenizer, *, mask_ratio: float | None = None, seed: int = 0,
                     batch_size: int = 64) -> float:
    """Mean squared error of `model`'s masked-value predictions over the masked genes of held-out `cells`.

    Args:
        model: a `ScMMGPTCellForMaskedValuePrediction`.
        cells: built cell rows (a `datasets.Dataset` or a list of `data.cell_features()` dicts).
        cell_tokenizer: the `ScMMGPTCellTokenizer` whose vocabulary the rows' gene ids refer to.
        mask_ratio: share of each cell's genes hidden; the model's own (`config.mask_ratio`) when None.
        seed: seeds the one mask drawn over all cells (`fixed_mask_batch`), shared by every model scored with it.

    Returns:
        MSE over all masked genes of all cells (each masked gene weighs the same).
    """
    import torch

    mask_ratio = model.mask_ratio if mask_ratio is None else mask_ratio
    batch = fixed_mask_batch(cells, cell_tokenizer, mask_ratio, seed, model.config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    squared, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, batch["gene_ids"].shape[0], batch_size):
            part = {k: v[start : start + batch_size].to(device) for k, v in batch.items()}
            out = model(**part)
            hidden = part["masked_positions"]
            squared += float(((out.predictions - part["expression_values"]) ** 2)[hidden].sum())
            count += int(hidden.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no gene was masked: the cells are empty or mask_ratio is too small for them")
    return squared / count


def gene_mean_mse(train_cells, eval_cells, cell_tokenizer, *, mask_ratio: float = 0.4, seed: int = 0,
                  max_train_cells: int = 50_000) -> float:
    """The masked-value MSE of a baseline that predicts each gene's mean value over the training cells (the global
    mean for genes never seen); a floor an encoder should beat to show it reads the cell, not just the gene. The
    means are summed a batch at a time over the first `max_train_cells` training cells, so a streamed corpus works."""
    import torch

    n_vocab = len(cell_tokenizer)
    sums, counts = torch.zeros(n_vocab, dtype=torch.float64), torch.zeros(n_vocab, dtype=torch.float64)
    collate, rows = MaskedValueCollator(cell_tokenizer), itertools.islice(iter(train_cells), max_train_cells)
    while chunk := list(itertools.islice(rows, 256)):
        train = collate(chunk)
        real = train["attention_mask"].bool() & (train["gene_ids"] != cell_tokenizer.cls_token_id)
        ids, values = train["gene_ids"][real], train["expression_values"][real].double()
        sums.index_add_(0, ids, values)
        counts.index_add_(0, ids, torch.ones_like(values))
    means = torch.where(counts > 0, sums / counts.clamp(min=1), sums.sum() / counts.sum())
    batch = fixed_mask_batch(eval_cells, cell_tokenizer, mask_ratio, seed)
    hidden = batch["masked_positions"]
    errors = (means[batch["gene_ids"]] - batch["expression_values"].double()) ** 2
    return float(errors[hidden].mean())


def pretrain_cell_encoder(
    train_cells=None,
    eval_cells=None,
    cell_tokenizer=None,
    *,
    config=None,
    args=None,
    output_dir: str = "stage0_cell_encoder",
    max_seconds: float | None = 120.0,
    mask_ratio: float = 0.4,
    progress: bool = True,
    save: bool = True,
    callbacks=None,
    augment=None,
    **training_args,
):
    r"""
    Stage 0 for the cell encoder: scGPT's masked value prediction (GEP) and value prediction from the cell embedding
    (GEPC) through `transformers.Trainer`.

    Args:
        train_cells, eval_cells: built cell rows (`data.build_dataset`); both None → the shipped PBMC cells, 90 / 10.
        cell_tokenizer: the `ScMMGPTCellTokenizer` of the rows (required when cells are given).
        config: a `ScMMGPTCellConfig`; by default `ScMMGPTCellConfig.tiny()` sized to the tokenizer.
        args: parsed `TrainingArguments` (the pipeline's); without them, `CELL_ENCODER_TRAINING` under
            `training_args` (any `TrainingArguments` field, e.g. `max_steps`, `seed`) with `output_dir` and `progress`.
            `args.seed` seeds the model's initialisation and the evaluation mask too.
        max_seconds: a wall-time guard next to `max_steps` (the LR schedule follows `max_steps`, so size `max_steps` to
            the time at hand and keep `max_seconds` as a guard).
        mask_ratio: share of each cell's gene tokens whose value is hidden (scGPT: 0.4); stored in the config.
        save: write the model (safetensors, loadable by `ScMMGPTCellModel.from_pretrained`), the cell tokenizer,
            `trainer_state.json` and the metrics to `args.output_dir`.
        callbacks: more `TrainerCallback`s.
        augment: a `CellAugmentation` for the training cells (see `augment.py`); None: cells as stored.

    Returns:
        `(model, metrics)`: the trained `ScMMGPTCellForMaskedValuePrediction` and a dict with `train_runtime`,
        `train_steps`, first / last logged `loss`, and on `eval_cells`: `masked_value_mse` (trained),
        `masked_value_mse_random_init` (the same model before training: the random encoder it started from) and
        `masked_value_mse_gene_mean` (per-gene mean baseline), all under one fixed mask (seed `args.seed`).
    """
    import torch

    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellForMaskedValuePrediction

    args = stage_training_arguments(args, CELL_ENCODER_TRAINING, output_dir, progress, training_args)
    seed = args.seed
    if train_cells is None:
        if eval_cells is not None:
            raise ValueError("eval_cells given without train_cells")
        max_genes = config.max_genes if config is not None else 256
        split, cell_tokenizer = pbmc_cells(max_genes=max_genes, seed=seed)
        train_cells, eval_cells = split["train"], split["test"]
    if cell_tokenizer is None:
        raise ValueError("pretrain_cell_encoder needs the cell_tokenizer whose vocabulary the rows' gene ids refer to")
    if config is None:
        config = ScMMGPTCellConfig.tiny(vocab_size=len(cell_tokenizer), max_genes=cell_tokenizer.max_genes)
    if config.vocab_size < len(cell_tokenizer):
        raise ValueError(f"config.vocab_size ({config.vocab_size}) is smaller than the cell tokenizer's vocabulary "
                         f"({len(cell_tokenizer)})")
    config.mask_ratio = float(mask_ratio)
    torch.manual_seed(seed)
    model = ScMMGPTCellForMaskedValuePrediction(config)

    metrics: dict = {}
    if eval_cells is not None:
        metrics["masked_value_mse_random_init"] = masked_value_mse(model, eval_cells, cell_tokenizer, seed=seed)
        metrics["masked_value_mse_gene_mean"] = gene_mean_mse(train_cells, eval_cells, cell_tokenizer,
                                                              mask_ratio=mask_ratio, seed=seed)
    trainer = LossPartsTrainer(
        model=model, args=args, train_dataset=train_cells, data_collator=MaskedValueCollator(cell_tokenizer, augment),
        callbacks=time_guarded(max_seconds, callbacks, progress), loss_parts=CELL_LOSS_PARTS,
    )
    result = trainer.train()
    model = trainer.model
    metrics.update(trained_metrics(trainer, result))
    if eval_cells is not None:
        metrics["masked_value_mse"] = masked_value_mse(model, eval_cells, cell_tokenizer, seed=seed)
    if save:
        save_trained(trainer, cell_tokenizer, "stage0", metrics)
    return model, metrics


# ------------------------------------------------------------------------------------------------ text
def llm_corpus(cell_texts=None, ontology=None, eval_size: int = 200, seed: int = 0) -> tuple[list[str], list[str]]:
    """The text corpus of the small LLM: `"cell type: {name}. {definition}"` for every defined Cell Ontology term,
    plus the cells' own texts; `eval_size` definitions held out by a seeded draw.

    Terms whose text is among `cell_texts` always stay in training (the cells' texts are what the model must write).
    `cell_texts=None` takes the shipped PBMC cells' texts.

    Returns:
        `(train_texts, eval_texts)`.
    """
    if cell_texts is None:
        split, _ = pbmc_cells(seed=seed)
        cell_texts = list(split["train"]["text"]) + list(split["test"]["text"])
    cell_texts = list(dict.fromkeys(cell_texts))  # distinct, in order
    definitions = [cell_type_text(name, definition) for name, definition in ontology_texts(ontology)]
    seen = set(cell_texts)
    candidates = [i for i, text in enumerate(definitions) if text not in seen]
    if eval_size >= len(candidates):
        raise ValueError(f"eval_size {eval_size} leaves no ontology text to train on ({len(candidates)} available)")
    held = set(np.random.default_rng(seed).choice(candidates, size=eval_size, replace=False).tolist())
    known = set(definitions)
    train = [t for i, t in enumerate(definitions) if i not in held] + [t for t in cell_texts if t not in known]
    return train, [definitions[i] for i in sorted(held)]


def train_text_tokenizer(texts, vocab_size: int = 4000, min_frequency: int = 2, model_max_length: int = 512):
    """A byte-level BPE tokenizer trained with `tokenizers` on `texts`, as a `PreTrainedTokenizerFast`.

    Byte-level, so any text encodes (no unknown characters); `<s>` is prepended to every encoded text (as Llama's
    tokenizer does), `</s>` ends a document, `<pad>` pads (right) and `<unk>` exists for tools that expect one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk = TEXT_SPECIAL_TOKENS
    backend = Tokenizer(models.BPE(unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(TEXT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        model_max_length=model_max_length, padding_side="right",
    )


def _encode_documents(tokenizer, texts, max_length: int) -> list[list[int]]:
    """`<s> text </s>` token ids of each text, cut to `max_length` tokens (the `</s>` kept)."""
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length - 1)["input_ids"]
    return [seq + [tokenizer.eos_token_id] for seq in ids]


def packed_lm_dataset(tokenizer, texts, block_size: int = 128):
    """Documents concatenated and cut into `block_size`-token blocks (no padding); `labels` = `input_ids`."""
    from datasets import Dataset

    stream = np.fromiter((t for doc in _encode_documents(tokenizer, texts, 10**9) for t in doc), dtype=np.int64)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size).tolist()
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def perplexity(model, tokenizer, texts, *, batch_size: int = 32, max_length: int = 256) -> float:
    """Token-level perplexity of a causal LM on `texts`, each scored alone as `<s> text </s>`:
    exp(total negative log-likelihood / predicted tokens), the `<s>` not predicted and padding ignored."""
    import torch
    import torch.nn.functional as F

    docs = _encode_documents(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            width = max(len(d) for d in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, doc in enumerate(chunk):
                ids[i, : len(doc)], mask[i, : len(doc)] = torch.tensor(doc), 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            nll += float((losses * mask[:, 1:]).sum())
            tokens += int(mask[:, 1:].sum())
    model.train(was_training)
    return math.exp(nll / tokens)


def small_llama_config(tokenizer, hidden_size: int = 128, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                       max_position_embeddings: int = 512):
    """A small `LlamaConfig` matched to `tokenizer` (vocabulary and special ids), embeddings tied to the LM head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # a small vocabulary's embedding is a large share of a small model
    )


def pretrain_small_llm(
    texts=None,
    output_dir: str = "stage0_llm",
    *,
    eval_texts=None,
    cell_texts=None,
    vocab_size: int = 4000,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    block_size: int = 128,
    args=None,
    max_seconds: float | None = 180.0,
    progress: bool = True,
    save: bool = True,
    callbacks=None,
    **training_args,
):
    r"""
    Stage 0 for the text side when no LLM is given: a byte-level BPE tokenizer and a small `LlamaForCausalLM`,
    pre-trained from scratch on the corpus text with `Trainer`.

    Args:
        texts: training documents; None → `llm_corpus(cell_texts)` (Cell Ontology definitions + the cells' texts).
        eval_texts: held-out documents for perplexity; with `texts` given and this None, a seeded 5 % of `texts`.
        vocab_size: BPE vocabulary size (special tokens included).
        hidden_size, num_hidden_layers, num_attention_heads: the Llama's shape.
        block_size: training sequences are the corpus packed into blocks of this many tokens.
        args: parsed `TrainingArguments` (the pipeline's); without them, `SMALL_LLM_TRAINING` under `training_args`
            (any `TrainingArguments` field, e.g. `max_steps`, `seed`) with `output_dir` and `progress`.
        max_seconds: a wall-time guard next to `max_steps` (the LR schedule follows `max_steps`).
        save: write the tokenizer and model (`save_pretrained`, safetensors), `trainer_state.json` and the metrics
            to `args.output_dir`, a folder `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` load.
        callbacks: more `TrainerCallback`s.

    Returns:
        `(model, tokenizer, metrics)`; metrics hold `perplexity_before`, `perplexity_after` (on `eval_texts`),
        `train_runtime`, `train_steps`, first / last logged `loss`, `n_train_texts`, `n_eval_texts`, `n_train_blocks`.
    """
    import torch
    from transformers import LlamaForCausalLM, default_data_collator

    args = stage_training_arguments(args, SMALL_LLM_TRAINING, output_dir, progress, training_args)
    seed = args.seed
    if texts is None:
        texts, default_eval = llm_corpus(cell_texts, seed=seed)
        eval_texts = default_eval if eval_texts is None else eval_texts
    elif eval_texts is None:
        order = np.random.default_rng(seed).permutation(len(texts))
        n_eval = max(1, len(texts) // 20)
        eval_texts = [texts[i] for i in order[:n_eval]]
        texts = [texts[i] for i in sorted(order[n_eval:])]
    tokenizer = train_text_tokenizer(texts, vocab_size=vocab_size, model_max_length=max(512, block_size))
    train_blocks = packed_lm_dataset(tokenizer, texts, block_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(small_llama_config(tokenizer, hidden_size, num_hidden_layers, num_attention_heads,
                                                max(512, block_size)))
    metrics = {"n_train_texts": len(texts), "n_eval_texts": len(eval_texts), "n_train_blocks": len(train_blocks),
               "vocab_size": len(tokenizer), "n_parameters": sum(p.numel() for p in model.parameters())}
    metrics["perplexity_before"] = perplexity(model, tokenizer, eval_texts)
    trainer = LossPartsTrainer(model=model, args=args, train_dataset=train_blocks, data_collator=default_data_collator,
                               callbacks=time_guarded(max_seconds, callbacks, progress))
    result = trainer.train()
    model = trainer.model
    metrics.update(trained_metrics(trainer, result), perplexity_after=perplexity(model, tokenizer, eval_texts))
    if save:
        save_trained(trainer, tokenizer, "stage0_llm", metrics)
    return model, tokenizer, metrics


__all__ = [
    "CELL_ENCODER_TRAINING",
    "SMALL_LLM_TRAINING",
    "MaskedValueCollator",
    "fixed_mask_batch",
    "gene_mean_mse",
    "llm_corpus",
    "masked_value_mse",
    "pbmc_cells",
    "pbmc_path",
    "perplexity",
    "pretrain_cell_encoder",
    "pretrain_small_llm",
    "small_llama_config",
    "train_text_tokenizer",
]
