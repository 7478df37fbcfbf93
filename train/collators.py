"""Collators: lists of built cell rows (`data.cell_features()`) → the exact keyword arguments of the models' `forward`.

Both tokenise cells on the fly (`streaming.rows_to_cell_inputs`), so they work the same on an in-memory dataset and
on a stream. Every batch carries the same keys whatever its examples are, so `Trainer` / `DataLoader` batching holds.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from dataclasses import dataclass, field

import numpy as np

from modeling_scmmgpt.processing_scmmgpt import qformer_text_inputs

from .augment import batch_seed, library_size
from .streaming import N_SPECIAL, log_normalized, rows_to_cell_inputs, rows_to_matrix

CELL_TO_TEXT = "cell_to_text"
TEXT_TO_CELL = "text_to_cell"
IGNORE_INDEX = -100  # labels ignored by the LM loss


def _row_seed(seed: int, row: dict) -> list[int]:
    """A per-cell seed, stable across processes and DataLoader workers (Python's `hash` is salted per process)."""
    return [int(seed), zlib.crc32(str(row.get("cell_id", "")).encode())]


def augmented(augment, rows: list[dict | None], cell_tokenizer) -> list[dict | None]:
    """`rows` through a collator's `CellAugmentation`, or as they are when it has none."""
    return rows if augment is None else augment(rows, len(cell_tokenizer.gene_names))


@dataclass
class ExpressedGenes:
    r"""
    A cell's own text: its cell-type sentence, then the genes it expresses most above the average training cell
    (`"cell type: B cell. Expressed genes: MS4A1, CD79A, ..."`, the way a user would describe a population by its
    markers).

    With one text per cell type, stage 1 learns one anchor per type and nothing of what a text says about genes; with
    these every cell's text differs, so the contrastive loss can only match a cell to its own text by the gene names
    in it. Ranked on log1p(CP10k) values of the stored (clean) cell minus the gene's mean over the training cells:
    raw expression would name the same housekeeping genes for every cell.

    Args:
        gene_names: the cell tokenizer's vocabulary genes (stored gene id − the special tokens).
        mean_expression: each vocabulary gene's mean log1p(CP10k) value over the training cells (`fit`).
        n_genes: how many genes a text names.
    """

    gene_names: list[str]
    mean_expression: np.ndarray
    n_genes: int = 8
    target_sum: float = 1e4

    @classmethod
    def fit(cls, rows, cell_tokenizer, n_genes: int = 8, max_cells: int = 10_000, chunk: int = 1024):
        """Gene means over the first `max_cells` rows of `rows` (a list, `datasets.Dataset` or stream)."""
        names = list(cell_tokenizer.gene_names)
        total, count = np.zeros(len(names)), 0
        rows = iter(rows)
        while count < max_cells and (part := list(itertools.islice(rows, min(chunk, max_cells - count)))):
            total += np.asarray(log_normalized(part, rows_to_matrix(part, len(names)),
                                               cell_tokenizer.target_sum).sum(0)).ravel()
            count += len(part)
        if not count:
            raise ValueError("ExpressedGenes.fit got no cells")
        return cls(names, total / count, n_genes, cell_tokenizer.target_sum)

    def genes(self, row: dict) -> list[str]:
        """The row's `n_genes` expressed genes furthest above their mean, highest first."""
        values = log_normalized([row], rows_to_matrix([row], len(self.gene_names)), self.target_sum)
        lift = values.data - self.mean_expression[values.indices]
        top = values.indices[np.argsort(-lift, kind="stable")[: self.n_genes]]
        return [self.gene_names[j] for j in top]

    def text(self, row: dict, text: str) -> str:
        """`text`'s first sentence (the cell type), then the row's genes."""
        return expressed_genes_text(text, self.genes(row))


def expressed_genes_text(text: str, genes) -> str:
    """`text`'s first sentence (`"cell type: X"`), then `"Expressed genes: A, B, ..."`: the form `ExpressedGenes`
    trains on, and the way to describe a cell type to such a model by its marker genes."""
    return f"{text.split('. ', 1)[0].rstrip('.')}. Expressed genes: {', '.join(genes)}."


@dataclass
class Stage1Collator:
    r"""
    Cells and their texts for stage 1 (`ScMMGPTModel.forward`: contrastive, matching and captioning losses).

    Args:
        cell_tokenizer: the model's `ScMMGPTCellTokenizer` (the vocabulary the rows' gene ids refer to).
        text_tokenizer: the Q-Former's text tokenizer (a BERT tokenizer).
        max_text_length: texts are truncated to this many tokens.
        text_column: the row field holding the text.
        augment: a `CellAugmentation` applied to the cells (texts unchanged); None: cells as stored.
        text_variants: `{CL id: (cell-type text, [variants])}` (`ontology.cell_type_text_variants`): with
            probability `text_variant_probability` a cell's cell-type text is replaced by one of its variants
            (synonyms, parent terms, the bare name), the rest of its text kept; drawn from `seed`.
        gene_vocab: the cell vocabulary (symbol → id) of a model with `text_gene_grounding`: each text token also
            gets the id of the gene symbol it belongs to (`qformer_gene_ids`); None: no gene ids.
        negative_texts: `{label: text}` whose texts every cell's text must also beat in the contrastive loss, but
            its own label's (stage 1's `label_negatives`: every training label's text); each batch carries them
            tokenised (`negative_texts`) and each cell's label's row among them (`label_text_index`, from the row's
            `label_column`).

    Returns (torch tensors):
        `gene_ids`, `expression_values`, `cell_attention_mask`: B × L_cell;
        `qformer_input_ids`, `qformer_attention_mask`: B × L_text (padded to the longest text), the Q-Former's text;
        `qformer_gene_ids` (B × L_text) with `gene_vocab`;
        with `negative_texts`: `negative_texts` (`{qformer_input_ids, qformer_attention_mask[, qformer_gene_ids]}`,
        N × L_neg) and `label_text_index` (B).
    """

    cell_tokenizer: object
    text_tokenizer: object
    max_text_length: int = 128
    text_column: str = "text"
    augment: object = None
    text_variants: dict | None = None
    text_variant_probability: float = 0.0
    expressed_genes: ExpressedGenes | None = None
    expressed_genes_probability: float = 0.0
    gene_vocab: dict | None = None
    negative_texts: dict | None = None
    label_column: str = "cell_type"
    seed: int = 0

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("Stage1Collator got an empty batch")
        batch = rows_to_cell_inputs(augmented(self.augment, rows, self.cell_tokenizer), self.cell_tokenizer)
        rng = np.random.default_rng(batch_seed(self.seed, rows, b"text variants"))
        texts = [self.text(r, rng) for r in rows]
        batch.update(qformer_text_inputs(self.text_tokenizer, texts, self.max_text_length, self.gene_vocab))
        if self.negative_texts:
            batch.update(self._negatives(rows))
        return batch

    def _negatives(self, rows: list[dict]) -> dict:
        import torch

        texts, row_of = self._tokenised_negatives
        own = torch.tensor([row_of.get(row.get(self.label_column), -1) for row in rows])
        return {"negative_texts": dict(texts), "label_text_index": own}

    @functools.cached_property
    def _tokenised_negatives(self) -> tuple[dict, dict]:
        """The negative texts' Q-Former inputs, tokenised once (every batch carries the same), and each label's row."""
        labels = list(self.negative_texts)
        texts = qformer_text_inputs(self.text_tokenizer, [self.negative_texts[label] for label in labels],
                                    self.max_text_length, self.gene_vocab)
        return texts, {label: i for i, label in enumerate(labels)}

    def text(self, row: dict, rng: np.random.Generator) -> str:
        """The row's text, its cell-type part swapped for a variant with probability `text_variant_probability`, then
        turned into the cell's expressed-genes text with probability `expressed_genes_probability`."""
        text = self._variant(row, rng)
        if self.expressed_genes is not None and rng.random() < self.expressed_genes_probability:
            return self.expressed_genes.text(row, text)
        return text

    def _variant(self, row: dict, rng: np.random.Generator) -> str:
        text = row[self.text_column]
        if not self.text_variants or not self.text_variant_probability:
            return text
        original, variants = self.text_variants.get(str(row.get("cell_type_ontology_term_id")), ("", []))
        if not variants or not text.startswith(original) or rng.random() >= self.text_variant_probability:
            return text
        return variants[rng.integers(len(variants))] + text[len(original):]


@dataclass
class Stage2Collator:
    r"""
    Prompt → target examples for stage 2 (`ScMMGPTForConditionalGeneration.forward`), of two kinds:

    - cell → text: `cell_to_text_prompt` (holding `<cell>`, expanded to `<boc><cell_0>…<eoc>`) then the cell's text;
      the cell is the input cell.
    - text → cell: `text_to_cell_prompt` (formatted with the cell's text) then the cell slots `<boc><cell_0>…<eoc>`
      as the target; the cell is the target cell, whose embedding and expression the model must reconstruct.

    A row's kind is its `task` field when present, else a seeded draw per cell (`text_to_cell_fraction`). A row may
    also carry its own `prompt` (and, for cell → text, `target`) fields.

    Args:
        processor: a `ScMMGPTProcessor` (cell tokenizer, text tokenizer with the cell tokens, `num_query_tokens`).
        text_to_cell_fraction: share of rows without a `task` that become text → cell examples.
        max_length: the longest sequence; cell → text targets are truncated to fit, prompts never.
        max_decoder_genes: the most expressed genes per target cell given to the expression decoder (its highest
            values, ties by gene id); None keeps all. As many unexpressed genes are sampled next to them.
        seed: seeds the kind draw and the unexpressed-gene sample, per cell, so batches are reproducible.
        augment: a `CellAugmentation` applied to the input cells of cell → text examples; the target cells of text →
            cell examples stay as stored (they are what a generated cell should look like).

    Returns (torch tensors; B examples):
        `input_ids`, `attention_mask`, `labels`: B × T, right-padded; `labels` is -100 on the prompt and padding.
        `gene_ids`, `expression_values`, `cell_attention_mask`: B × L, the input cell of each cell → text example; a
            text → cell example gets an all-padding cell (`<cls>` only, mask 1 at position 0 alone).
        `target_gene_ids`, `target_expression_values`, `target_cell_attention_mask`: B × L', the target cell of each
            text → cell example, tokenised for its true embedding; all-padding for cell → text examples.
        `decoder_gene_ids`, `decoder_targets`, `decoder_mask`: B × G, genes whose log1p-normalised expression the
            decoder predicts (the target cell's expressed genes, then as many sampled unexpressed ones at 0);
            `decoder_mask` holds each gene's loss weight (float), all 0 for cell → text examples and padding: 1 for
            expressed genes, (unexpressed genes) / (sampled ones) for the sampled zeros, so that the weighted MSE is
            an unbiased estimate of the MSE over every gene of the vocabulary. With equal weights a gene expressed in
            a fraction p of a type's cells is scored as a zero about half as often as it is one, and the decoder
            learns inflated values for rarely expressed genes. Targets are log1p(x / total · target_sum) for count
            rows and the stored values for log-normalised rows.
        `decoder_counts`: B × G, the same genes' counts (a count decoder's targets): stored counts, or for a
            log-normalised row round(expm1(value) · library / target_sum) (`library_size`); 0 where unexpressed.
        `decoder_size_factors`: B, each target cell's library size / target_sum (1 for cell → text examples).
    """

    processor: object
    cell_to_text_prompt: str = "<cell>\nDescribe this cell.\n"
    text_to_cell_prompt: str = "Generate a cell matching this description: {text}\n"
    text_to_cell_fraction: float = 0.5
    max_length: int = 512
    max_decoder_genes: int | None = None
    seed: int = 0
    text_column: str = "text"
    augment: object = None
    _slots: str = field(init=False, repr=False, default="")

    def __post_init__(self):
        if "<cell>" not in self.cell_to_text_prompt:
            raise ValueError(f"cell_to_text_prompt must contain '<cell>': {self.cell_to_text_prompt!r}")
        self._slots = self.processor.cell_slot_text

    @property
    def cell_tokenizer(self):
        return self.processor.feature_extractor

    @property
    def text_tokenizer(self):
        return self.processor.tokenizer

    def kind(self, row: dict) -> str:
        """`"cell_to_text"` or `"text_to_cell"` for a row (its `task`, else a seeded draw)."""
        task = row.get("task")
        if task is not None:
            if task not in (CELL_TO_TEXT, TEXT_TO_CELL):
                raise ValueError(f"row task must be {CELL_TO_TEXT!r} or {TEXT_TO_CELL!r}, got {task!r}")
            return task
        draw = np.random.default_rng(_row_seed(self.seed + 1, row)).random()
        return TEXT_TO_CELL if draw < self.text_to_cell_fraction else CELL_TO_TEXT

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if not rows:
            raise ValueError("Stage2Collator got an empty batch")
        kinds = [self.kind(r) for r in rows]
        batch = self._text(rows, kinds)
        inputs = [r if k == CELL_TO_TEXT else None for r, k in zip(rows, kinds)]
        batch.update(rows_to_cell_inputs(augmented(self.augment, inputs, self.cell_tokenizer), self.cell_tokenizer))
        target = rows_to_cell_inputs([r if k == TEXT_TO_CELL else None for r, k in zip(rows, kinds)],
                                     self.cell_tokenizer)
        batch.update({f"target_{k}": v for k, v in target.items()})
        batch.update({k: torch.from_numpy(v) for k, v in self._decoder(rows, kinds).items()})
        return batch

    # ------------------------------------------------------------------------------------------------- text side
    def _example(self, row: dict, kind: str) -> tuple[str, str]:
        """(prompt with cell slots expanded, target) of one row."""
        if kind == CELL_TO_TEXT:
            prompt = row.get("prompt") or self.cell_to_text_prompt
            if prompt.count("<cell>") != 1:
                raise ValueError(f"a cell → text prompt needs exactly one '<cell>': {prompt!r}")
            return prompt.replace("<cell>", self._slots), row.get("target") or row[self.text_column]
        prompt = row.get("prompt") or self.text_to_cell_prompt.format(text=row[self.text_column])
        return prompt, self._slots

    def _ids(self, text: str) -> list[int]:
        return self.text_tokenizer(text, add_special_tokens=False)["input_ids"]

    def _text(self, rows: list[dict], kinds: list[str]) -> dict:
        import torch

        tok = self.text_tokenizer
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        tail = [tok.eos_token_id] if tok.eos_token_id is not None else []
        sequences = []
        for row, kind in zip(rows, kinds):
            prompt, target = self._example(row, kind)
            prompt_ids, target_ids = head + self._ids(prompt), self._ids(target) + tail
            room = self.max_length - len(prompt_ids)
            if room < (len(target_ids) if kind == TEXT_TO_CELL else 1):
                raise ValueError(f"cell {row.get('cell_id')!r}: prompt ({len(prompt_ids)} tokens) and cell slots do "
                                 f"not fit in max_length={self.max_length}")
            target_ids = target_ids[:room]  # only cell → text targets can be cut (checked above)
            sequences.append((prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids))
        longest = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(rows), longest), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, (ids, lab) in enumerate(sequences):
            input_ids[i, : len(ids)], labels[i, : len(lab)], attention[i, : len(ids)] = (
                torch.tensor(ids), torch.tensor(lab), 1)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    # ------------------------------------------------------------------------------------------------- decoder
    def decoder_genes(self, row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vocabulary gene ids, log1p-normalised targets, loss weights) of one target cell: expressed genes, then as
        many unexpressed genes drawn with the row's seed (targets 0, each standing for all unexpressed genes)."""
        n_genes = len(self.cell_tokenizer.gene_names)
        values = log_normalized([row], rows_to_matrix([row], n_genes), self.cell_tokenizer.target_sum)
        genes, expr = values.indices.astype(np.int64), values.data
        keep = expr > 0
        genes, expr = genes[keep], expr[keep]
        if self.max_decoder_genes is not None and genes.size > self.max_decoder_genes:
            top = np.lexsort((genes, -expr))[: self.max_decoder_genes]
            genes, expr = genes[top], expr[top]
        unexpressed = np.setdiff1d(np.arange(n_genes), values.indices, assume_unique=True)
        rng = np.random.default_rng(_row_seed(self.seed, row))
        sampled = rng.choice(unexpressed, size=min(genes.size, unexpressed.size), replace=False)
        ids = np.concatenate([genes, sampled]) + N_SPECIAL
        zero_weight = unexpressed.size / max(sampled.size, 1)
        weights = np.concatenate([np.ones(genes.size), np.full(sampled.size, zero_weight)]).astype(np.float32)
        return ids, np.concatenate([expr, np.zeros(sampled.size)]).astype(np.float32), weights

    def _decoder(self, rows: list[dict], kinds: list[str]) -> dict:
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))
        per_row = [self.decoder_genes(r) if k == TEXT_TO_CELL else empty for r, k in zip(rows, kinds)]
        width = max(1, max(ids.size for ids, _, _ in per_row))  # at least 1 so the key's shape is always valid
        gene_ids = np.full((len(rows), width), self.cell_tokenizer.pad_token_id, dtype=np.int64)
        targets = np.zeros((len(rows), width), dtype=np.float32)
        weights = np.zeros((len(rows), width), dtype=np.float32)
        counts = np.zeros((len(rows), width), dtype=np.float32)
        size_factors = np.ones(len(rows), dtype=np.float32)
        target_sum = self.cell_tokenizer.target_sum
        for i, (row, kind, (ids, vals, w)) in enumerate(zip(rows, kinds, per_row)):
            gene_ids[i, : ids.size], targets[i, : ids.size], weights[i, : ids.size] = ids, vals, w
            if kind == TEXT_TO_CELL:
                library = library_size(row, target_sum)
                size_factors[i] = max(library, 1.0) / target_sum
                # targets are log1p(x · target_sum / library): inverting them gives back a count row's own counts
                counts[i, : ids.size] = np.round(np.expm1(vals.astype(np.float64)) * library / target_sum)
        return {"decoder_gene_ids": gene_ids, "decoder_targets": targets, "decoder_mask": weights,
                "decoder_counts": counts, "decoder_size_factors": size_factors}


__all__ = ["CELL_TO_TEXT", "IGNORE_INDEX", "TEXT_TO_CELL", "ExpressedGenes", "Stage1Collator", "Stage2Collator",
           "augmented", "expressed_genes_text"]
