"""The paper's shapes, measured: stage-1 and stage-2 training steps and the four jobs, random weights, nothing downloaded.

    python benchmarks/bench_paper_shape.py                          # CPU: 1 step, batch 2, 256 genes, a small LLM
    python benchmarks/bench_paper_shape.py --device cuda --llm 7b   # GPU: Llama-2-7B (>= 40 GB), official + largest batches
    make bench-paper

The model is built the way training builds it: `stage1.stage1_config` with the `paper` preset (scGPT whole-human
encoder over a 60,697-token gene vocabulary, BERT-base Q-Former, 32 queries, cross-attention every 2nd layer),
`stage2.build_stage2_model` + `apply_tuning` (LoRA r 8, alpha 32 on the LLM's attention and MLP projections,
projectors and expression decoder in full) wrapped by peft, batches from the training collators over synthetic cell
rows, inference through `ScMMGPTJobs`. The LLM is a Llama shape chosen by `--llm` (`LLM_SHAPES`); its tokenizer is a
byte-level BPE trained on the shipped Cell Ontology texts (~9k tokens; the LLM keeps Llama's 32,000 rows).

Rows (one per measurement, each also written to the JSON file):
- `stage1` / `stage2_lora` / `stage2_qlora`: a training step (forward, backward, AdamW) at the official code's per-GPU
  batch (stage 1: 12 cells, stage 2: 4 examples; `--stage1-batch` / `--stage2-batch`) and, on a GPU, at the largest
  batch that fits (doubled until out of memory). bf16 autocast on CUDA, fp32 on CPU; SDPA attention. QLoRA loads
  the LLM's linear layers as 4-bit NF4 through bitsandbytes (CUDA only: elsewhere the row says why it was skipped).
- `embed`, `annotate_retrieval`, `describe` (`--new-tokens` greedy tokens), `generate_cells` (every vocabulary gene).

Figures: cells/s; tokens/s (stage 1 and embed / annotate: gene tokens through the cell encoder; stage 2: LLM tokens,
padding excluded; describe: new tokens); peak memory (CUDA: max allocated; CPU: the process's peak RSS during the
row, reset before it through /proc/self/clear_refs); model FLOPs utilisation: the FLOPs of the first step or call
counted by `torch.utils.flop_counter` (matmuls and attention, backward included), per second of a timed step, over
the device's dense bf16 peak (`BF16_PEAK_TFLOPS`; on CPU the fp32 matmul peak measured here, as bench_encoder does).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_encoder import matmul_peak  # noqa: E402
from benchmarks.common import ROOT, current_rss_mb, machine_info  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "paper_shape.json")
SCGPT_HUMAN_GENES = 60_694  # scGPT whole-human vocab.json: 60,697 tokens, <pad> / <cls> / <eoc> among them
OFFICIAL_BATCH = {"stage1": 12, "stage2": 4}  # per GPU in the official training scripts
# dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s), matched against torch's device name in order
# (other GPUs: a measured bf16 matmul peak)
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)]
# Llama shapes of the LLM (vocabulary 32,000 in each): 7b = Llama-2-7B, 1b = TinyLlama-1.1B's, small = the CPU
# default, tiny = the test's
LLM_SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=688),
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64),
}
# the cell side: paper = scGPT whole-human + BERT-base Q-Former, projectors and decoder 256 wide (the preset as is);
# tiny = shrunk widths (the gene vocabulary and the 32 queries kept) for the test
CELL_SIDES = {
    "paper": dict(cell_config={}, qformer_config={}),
    "tiny": dict(cell_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
                 qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                 embed_dim=16, projector_hidden_size=32, expression_decoder_hidden_size=16),
}
GPU_MIN_MEMORY_7B_GB = 40


@dataclass
class Settings:
    """What one run measures (see `parse_args` for the command line)."""

    device: str = "cpu"
    llm: str = "small"
    cell_side: str = "paper"
    genes: int = 256
    steps: int = 1
    warmup: int = 0
    stage1_batch: int = 2
    stage2_batch: int = 2
    largest_batch: bool = False
    max_step_seconds: float = 30.0  # the doubling stops after a step slower than this
    cells: int = 2  # cells (and texts) each job reads
    new_tokens: int = 4
    text_length: int = 128
    qlora: bool = True
    peak_n: int = 2048
    json_path: str | None = RESULTS
    seed: int = 0


# ---------------------------------------------------------------------------------------------------- measuring
def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _flop_counter():
    """`FlopCounterMode` that also counts CPU SDPA (torch registers only the CUDA kernels)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })


def _reset_peak_memory(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return current_rss_mb()


def timed(fn, device: str, steps: int, warmup: int) -> dict:
    """Run `fn` `warmup` + `steps` times; the first run is FLOP-counted. Returns mean seconds of the timed runs, the
    counted FLOPs of one run and the peak memory over all of them."""
    _reset_peak_memory(device)
    seconds, flops = [], None
    for i in range(warmup + steps):
        counter = _flop_counter() if flops is None else nullcontext()
        _sync(device)
        start = time.perf_counter()
        with counter:
            fn()
        _sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        if flops is None:
            flops = counter.get_total_flops()
    return {"seconds": float(np.mean(seconds)), "flops": int(flops), "peak_memory_mb": _peak_memory_mb(device)}


def device_peak(settings: Settings) -> dict:
    """The FLOP/s MFU is taken against: the data-sheet dense bf16 peak of a known GPU, else a measured matmul peak
    (bf16 on a GPU, fp32 on CPU, which is what the CPU rows compute in)."""
    if settings.device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        measured = matmul_peak(n=8192, device=settings.device, dtype="bfloat16")["gflops"] / 1e3
        for key, tflops in BF16_PEAK_TFLOPS:
            if key in name:
                return {"peak_tflops": tflops, "peak_source": f"{name}: data-sheet dense bf16",
                        "measured_matmul_tflops": round(measured, 1)}
        return {"peak_tflops": measured, "peak_source": f"{name}: measured bf16 8192^3 matmul",
                "measured_matmul_tflops": round(measured, 1)}
    measured = matmul_peak(n=settings.peak_n, device="cpu", dtype="float32")["gflops"] / 1e3
    return {"peak_tflops": measured, "peak_source": f"CPU: measured fp32 {settings.peak_n}^3 matmul, "
            f"{torch.get_num_threads()} threads", "measured_matmul_tflops": round(measured, 4)}


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _row(name: str, batch: int, result: dict, peak_tflops: float, cells: int, tokens: int, **extra) -> dict:
    seconds = result["seconds"]
    achieved = result["flops"] / seconds / 1e12
    return {"name": name, "status": "ok", "batch": batch, "seconds": _significant(seconds),
            "cells_per_s": _significant(cells / seconds), "tokens_per_s": _significant(tokens / seconds),
            "peak_memory_mb": round(result["peak_memory_mb"], 1), "tflop_per_step": _significant(result["flops"] / 1e12),
            "achieved_tflops": _significant(achieved), "mfu": _significant(achieved / peak_tflops), **extra}


def _free(device: str):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- the parts
@dataclass
class Parts:
    """What every row shares: the tokenizers, the processor, and the cell-type names and texts the rows cycle through."""

    cell_tokenizer: object
    qformer_tokenizer: object
    processor: object
    texts: list[str]
    names: list[str]


def build_parts(settings: Settings) -> Parts:
    """The gene vocabulary of scGPT whole-human's size (synthetic names), the shipped MiniLM BERT tokenizer for the
    Q-Former (BERT's 30,522-token vocabulary, as PubMedBERT's), and an LLM tokenizer trained on the Cell Ontology."""
    import copy

    from transformers import AutoTokenizer

    from modeling_scmmgpt import ScMMGPTCellTokenizer, ScMMGPTProcessor
    from modeling_scmmgpt.ontology_scmmgpt import cell_type_text, load_cell_ontology
    from scmmgpt_train.pretrain import train_text_tokenizer
    from scmmgpt_train.stages import shipped_minilm_path

    terms = load_cell_ontology().texts()
    texts = [cell_type_text(name, definition) for name, definition in terms]
    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=[f"GENE{i}" for i in range(SCGPT_HUMAN_GENES)],
                                          max_genes=settings.genes)
    qformer = AutoTokenizer.from_pretrained(shipped_minilm_path())
    llm_tokenizer = train_text_tokenizer(texts, vocab_size=32_000)
    processor = ScMMGPTProcessor(cell_tokenizer, llm_tokenizer, qformer_tokenizer=copy.deepcopy(qformer),
                                 num_query_tokens=32)
    return Parts(cell_tokenizer, qformer, processor, texts, [name for name, _ in terms])


def synthetic_rows(parts: Parts, n: int, genes: int, seed: int = 0) -> list[dict]:
    """`n` built cell rows (count values) with `2 * genes` expressed genes each, so every cell fills `genes` tokens;
    texts cycle through the ontology's cell-type texts."""
    rng = np.random.default_rng(seed)
    vocab = len(parts.cell_tokenizer.gene_names)
    rows = []
    for i in range(n):
        ids = np.sort(rng.choice(vocab, size=min(2 * genes, vocab), replace=False)) + 3  # after the special tokens
        counts = rng.geometric(0.3, size=ids.size).astype(np.float32)
        k = i % len(parts.texts)
        rows.append({"cell_id": f"cell_{i}", "gene_ids": ids, "expression": counts,
                     "total_counts": float(counts.sum()), "value_kind": "counts", "text": parts.texts[k],
                     "cell_type": parts.names[k]})
    return rows


def build_stage1(parts: Parts, settings: Settings):
    from modeling_scmmgpt import ScMMGPTModel
    from scmmgpt_train.stage1 import stage1_config

    config = stage1_config(parts.cell_tokenizer, parts.qformer_tokenizer, preset="paper",
                           max_text_length=settings.text_length, **CELL_SIDES[settings.cell_side])
    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        return ScMMGPTModel(config)


def build_llm(settings: Settings, dtype):
    from transformers import AutoModelForCausalLM

    from modeling_scmmgpt import ScMMGPTConfig

    config = ScMMGPTConfig.paper().text_config  # Llama-2-7B's config, resized below to the chosen shape
    for key, value in LLM_SHAPES[settings.llm].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def quantize_4bit(llm):
    """Replace the LLM's decoder linear layers by bitsandbytes NF4 `Linear4bit` (double quantisation, bf16 compute),
    as `from_pretrained` with `stage2.quantization_config_4bit()` loads them; the LM head stays in bf16."""
    import bitsandbytes as bnb

    for parent in list(llm.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", module=layer)
                setattr(parent, name, layer.to(child.weight.device))  # the move quantises
    return llm


def build_stage2(stage1, parts: Parts, settings: Settings, four_bit: bool = False):
    """The peft-wrapped stage-2 model (LoRA on the LLM, projectors and decoder trained in full) and its arguments."""
    from peft import get_peft_model

    from scmmgpt_train.stage2 import Stage2Arguments, apply_tuning, build_stage2_model

    cuda = settings.device.startswith("cuda")
    llm = build_llm(settings, torch.bfloat16 if cuda else torch.float32)
    if four_bit:
        llm = quantize_4bit(llm)
    args = Stage2Arguments(tuning="lora", lora_r=8, lora_alpha=32, lora_dropout=0.1, text_to_cell_fraction=0.5)
    with torch.device(settings.device):
        model = build_stage2_model(stage1, llm, parts.processor, seed=settings.seed)
    model, lora = apply_tuning(model, args)
    return get_peft_model(model, lora), args


# ---------------------------------------------------------------------------------------------------- training rows
def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


def _training_step(model, optimizer, batch: dict, device: str):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()

    return step


def stage1_batches(parts: Parts, settings: Settings):
    """batch size → (the stage-1 collator's batch, gene tokens in it)."""
    from scmmgpt_train.stage1 import stage1_collator

    collator = stage1_collator(parts.cell_tokenizer, parts.qformer_tokenizer, max_text_length=settings.text_length)

    def make(size: int):
        batch = collator(synthetic_rows(parts, size, settings.genes, settings.seed))
        return batch, int(batch["cell_attention_mask"].sum())

    return make


def stage2_batches(parts: Parts, settings: Settings, args):
    """batch size → (the stage-2 collator's batch, half cell → text and half text → cell; LLM tokens in it)."""
    from scmmgpt_train.stage2 import stage2_collator

    collator = stage2_collator(parts.processor, args, max_length=512, seed=settings.seed)

    def make(size: int):
        batch = collator(synthetic_rows(parts, size, settings.genes, settings.seed))
        return batch, int(batch["attention_mask"].sum())

    return make


def _train_at(name: str, model, optimizer, make_batch, size: int, settings: Settings, peak: float, **extra) -> dict:
    batch, tokens = make_batch(size)
    batch = _to(batch, settings.device)
    try:
        result = timed(_training_step(model, optimizer, batch, settings.device), settings.device, settings.steps,
                       settings.warmup)
    finally:
        optimizer.zero_grad(set_to_none=True)
        batch = None
        _free(settings.device)
    return _row(name, size, result, peak, cells=size, tokens=tokens, **extra)


def training_rows(name: str, model, make_batch, batch_size: int, settings: Settings, peak: float) -> list[dict]:
    """The step at the official batch and, with `settings.largest_batch`, at the largest batch that fits: doubled
    from the official one until a step runs out of memory (or takes longer than `settings.max_step_seconds`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    extra = dict(trainable_params_m=round(sum(p.numel() for p in trainable) / 1e6, 3),
                 parameters_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3))
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model.train()
    rows = [_train_at(name, model, optimizer, make_batch, batch_size, settings, peak, **extra)]
    if settings.largest_batch:
        largest, size, limit = None, batch_size, "no limit hit"
        while True:
            size *= 2
            try:
                largest = _train_at(f"{name} (largest batch)", model, optimizer, make_batch, size, settings, peak,
                                    **extra)
            except torch.OutOfMemoryError:
                limit = f"batch {size} ran out of memory"
                break
            if largest["seconds"] > settings.max_step_seconds:
                limit = f"stopped: a step took over {settings.max_step_seconds:g} s"
                break
        rows.append({**largest, "limit": limit} if largest else {"name": f"{name} (largest batch)", "status": limit})
    return rows


def qlora_rows(stage1, parts: Parts, settings: Settings, peak: float) -> list[dict]:
    """Stage 2 with the LLM in 4-bit (QLoRA), or one row saying why not."""
    if not settings.qlora:
        return [{"name": "stage2_qlora", "status": "skipped: --no-qlora"}]
    if not settings.device.startswith("cuda"):
        return [{"name": "stage2_qlora", "status": "skipped: bitsandbytes 4-bit needs CUDA"}]
    if importlib.util.find_spec("bitsandbytes") is None:
        return [{"name": "stage2_qlora", "status": "skipped: bitsandbytes is not installed"}]
    model, args = build_stage2(stage1, parts, settings, four_bit=True)
    try:
        return training_rows("stage2_qlora", model, stage2_batches(parts, settings, args), settings.stage2_batch,
                             settings, peak)
    finally:
        model = None
        _free(settings.device)


# ---------------------------------------------------------------------------------------------------- inference rows
def inference_rows(model, parts: Parts, settings: Settings, peak: float) -> list[dict]:
    """The four jobs through `ScMMGPTJobs` on `settings.cells` synthetic cells (count matrix over the vocabulary)."""
    from modeling_scmmgpt import ScMMGPTJobs
    from scmmgpt_train.streaming import rows_to_matrix

    jobs = ScMMGPTJobs(model, parts.processor, progress=False, verbose=False)
    genes = parts.cell_tokenizer.gene_names
    cells = rows_to_matrix(synthetic_rows(parts, settings.cells, settings.genes, settings.seed + 1), len(genes))
    n, gene_tokens = settings.cells, settings.cells * (settings.genes + 1)
    labels, label_texts = parts.names[:10], parts.texts[:10]
    texts = [parts.texts[i % len(parts.texts)] for i in range(n)]
    runs = {
        "embed": (lambda: jobs.embed(cells, gene_names=genes), gene_tokens),
        "annotate_retrieval": (lambda: jobs.annotate(cells, labels, method="retrieval", label_texts=label_texts,
                                                     gene_names=genes), gene_tokens),
        # min_new_tokens: a random LLM may end early; every cell gets the same number of new tokens
        "describe": (lambda: jobs.describe(cells, max_new_tokens=settings.new_tokens, gene_names=genes,
                                           generate_kwargs={"min_new_tokens": settings.new_tokens}),
                     n * settings.new_tokens),
        "generate_cells": (lambda: jobs.generate_cells(texts, seed=0), n * len(genes)),
    }
    rows = []
    for name, (job, tokens) in runs.items():
        def call(job=job):
            with _autocast(settings.device), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                job()

        result = timed(call, settings.device, settings.steps, settings.warmup)
        rows.append(_row(name, n, result, peak, cells=n, tokens=tokens))
    rows[-1]["note"] = "tokens: decoded genes"
    return rows


# ---------------------------------------------------------------------------------------------------- the run
def _guarded(name: str, fn) -> list[dict]:
    """A failing measurement is a row to show, not a reason to lose the others."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001
        return [{"name": name, "status": f"error: {type(error).__name__}: {str(error)[:300]}"}]


def run(settings: Settings) -> dict:
    """All rows; writes them as JSON to `settings.json_path` (unless None) and returns the result."""
    start = time.perf_counter()
    peak = device_peak(settings)
    parts = build_parts(settings)
    rows = []
    stage1 = build_stage1(parts, settings)
    rows += _guarded("stage1", lambda: training_rows("stage1", stage1, stage1_batches(parts, settings),
                                                     settings.stage1_batch, settings, peak["peak_tflops"]))
    _free(settings.device)

    def stage2_and_jobs():
        model, args = build_stage2(stage1, parts, settings)
        out = training_rows("stage2_lora", model, stage2_batches(parts, settings, args), settings.stage2_batch,
                            settings, peak["peak_tflops"])
        merged = model.merge_and_unload().eval()
        return out + inference_rows(merged, parts, settings, peak["peak_tflops"])

    rows += _guarded("stage2_lora", stage2_and_jobs)
    _free(settings.device)
    rows += _guarded("stage2_qlora", lambda: qlora_rows(stage1, parts, settings, peak["peak_tflops"]))
    settings_out = {k: v for k, v in vars(settings).items() if k != "json_path"}
    result = {"machine": machine_info(), "settings": settings_out, **peak, "rows": rows,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    if settings.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(settings.json_path)), exist_ok=True)
        with open(settings.json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table (peak memory: CUDA max allocated, or the CPU process's peak RSS)."""
    memory = "peak CUDA MB" if result["settings"]["device"].startswith("cuda") else "peak RSS MB"
    lines = [f"| row | batch | s / step | cells/s | tokens/s | {memory} | TFLOP/s | MFU | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['name']} | | | | | | | | {row['status']} |")
            continue
        note = f"trainable {row['trainable_params_m']:g} M of {row['parameters_m']:g} M" if "parameters_m" in row else ""
        note = "; ".join(x for x in (note, row.get("limit", ""), row.get("note", "")) if x)
        lines.append(f"| {row['name']} | {row['batch']} | {row['seconds']:.3g} | {row['cells_per_s']:g} | "
                     f"{row['tokens_per_s']:g} | {row['peak_memory_mb']:.0f} | {row['achieved_tflops']:.3g} | "
                     f"{100 * row['mfu']:.1f} % | {note} |")
    return "\n".join(lines)


def settings_from_args(argv=None) -> Settings:
    """Command line → `Settings`, with defaults by device (CPU: the quick shape; CUDA: the paper's batches)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llm", choices=sorted(LLM_SHAPES), help="default: 7b on a GPU with >= 40 GB, 1b on a "
                        "smaller one, small on CPU")
    parser.add_argument("--cell-side", choices=sorted(CELL_SIDES), default="paper")
    parser.add_argument("--genes", type=int, help="gene tokens per cell (default: 2048 on CUDA, 256 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 1 on CUDA, 0 on CPU)")
    parser.add_argument("--stage1-batch", type=int, help=f"default: {OFFICIAL_BATCH['stage1']} on CUDA, 2 on CPU")
    parser.add_argument("--stage2-batch", type=int, help=f"default: {OFFICIAL_BATCH['stage2']} on CUDA, 2 on CPU")
    parser.add_argument("--no-largest-batch", action="store_true", help="skip the doubling search (CUDA)")
    parser.add_argument("--cells", type=int, help="cells per job (default: 256 on CUDA, 2 on CPU)")
    parser.add_argument("--new-tokens", type=int, help="describe's new tokens (default: 16 on CUDA, 4 on CPU)")
    parser.add_argument("--no-qlora", action="store_true")
    parser.add_argument("--peak-n", type=int, default=2048, help="CPU: size of the matmul measuring the peak")
    parser.add_argument("--json", default=RESULTS, help=f"where the rows go (default {os.path.relpath(RESULTS)})")
    a = parser.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if cuda:
        memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        llm = a.llm or ("7b" if memory_gb >= GPU_MIN_MEMORY_7B_GB else "1b")
        if llm == "7b" and memory_gb < GPU_MIN_MEMORY_7B_GB:
            parser.error(f"--llm 7b needs a GPU with >= {GPU_MIN_MEMORY_7B_GB} GB ({memory_gb:.0f} GB here)")
    else:
        llm = a.llm or "small"

    def pick(value, on_cuda, on_cpu):
        return value if value is not None else (on_cuda if cuda else on_cpu)

    return Settings(device=a.device, llm=llm, cell_side=a.cell_side, genes=pick(a.genes, 2048, 256),
                    steps=pick(a.steps, 5, 1), warmup=pick(a.warmup, 1, 0),
                    stage1_batch=pick(a.stage1_batch, OFFICIAL_BATCH["stage1"], 2),
                    stage2_batch=pick(a.stage2_batch, OFFICIAL_BATCH["stage2"], 2),
                    largest_batch=cuda and not a.no_largest_batch, cells=pick(a.cells, 256, 2),
                    new_tokens=pick(a.new_tokens, 16, 4), qlora=not a.no_qlora, peak_n=a.peak_n, json_path=a.json)


def main(argv=None) -> dict:
    settings = settings_from_args(argv)
    result = run(settings)
    print(f"{result['peak_source']}: {result['peak_tflops']:.4g} TFLOP/s; LLM {settings.llm}, cell side "
          f"{settings.cell_side}, {settings.genes} genes per cell; {result['wall_seconds']} s in all")
    print(markdown_table(result))
    if settings.json_path:
        print(f"rows written to {settings.json_path}")
    return result


if __name__ == "__main__":
    main()
