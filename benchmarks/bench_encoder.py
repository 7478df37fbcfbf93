"""Cell-encoder forward: throughput (cells/s), peak RSS and achieved FLOP/s against the machine's matmul FLOP/s.

Inputs are full cells (every cell has `max_genes` expressed genes, so L = max_genes + 1 tokens, no padding), random
gene ids and values, under `torch.inference_mode()` with the model in eval mode.

FLOPs are counted analytically (multiply-add = 2 FLOPs), the matmuls only: per layer QKV projection 2·B·L·d·3d, output
projection 2·B·L·d², attention scores and attention × values 2·2·B·L²·d, feed-forward 2·2·B·L·d·d_ff; plus the value
encoder's d×d linear. LayerNorm, softmax, GELU/ReLU and embedding lookups are left out (a few % of the work), so the
figure slightly understates the machine's real work.
"""

import time

import torch

from .common import best_time

CONFIGS = {
    # the test-size encoder
    "tiny": dict(preset="tiny", max_genes=256, vocab_size=20_003),
    # scGPT whole-human shape (d_model 512, 12 layers, 8 heads, d_hid 512) with a 20k-gene vocabulary
    "base": dict(preset="scgpt_human", max_genes=512, vocab_size=20_003),
}


def build(config_name: str, device: str = "cpu", dtype: str = "float32", compile: bool = False):
    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel

    spec = CONFIGS[config_name]
    factory = getattr(ScMMGPTCellConfig, spec["preset"])
    config = factory(vocab_size=spec["vocab_size"], max_genes=spec["max_genes"], hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = ScMMGPTCellModel(config).eval().to(device=device, dtype=getattr(torch, dtype))
    if compile:
        model = torch.compile(model)
    return model, config


def forward_flops(config, batch: int, length: int) -> int:
    d, d_ff = config.hidden_size, config.intermediate_size
    per_layer = 2 * batch * length * d * 3 * d + 2 * batch * length * d * d + 4 * batch * length**2 * d
    per_layer += 4 * batch * length * d * d_ff
    return config.num_hidden_layers * per_layer + 2 * batch * length * d * d


def random_cells(config, batch: int, device: str):
    generator = torch.Generator().manual_seed(0)
    length = config.max_genes + 1
    gene_ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    gene_ids[:, 0] = config.cls_token_id
    values = torch.rand(batch, length, generator=generator) * 5
    mask = torch.ones(batch, length, dtype=torch.long)
    return {"gene_ids": gene_ids.to(device), "expression_values": values.to(device), "attention_mask": mask.to(device)}


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(config_name: str, batch: int, device: str = "cpu", dtype: str = "float32", compile: bool = False,
        min_seconds: float = 2.0, warmup_full: bool = True, with_matmul_peak: bool = False) -> dict:
    """Embedding throughput at one batch size. Warm-up runs a full batch once (first-touch page faults and kernel
    selection make the first run slower) unless `warmup_full` is False, then a batch of 1.

    `with_matmul_peak` also measures the matmul FLOP/s in this process just before and after the forward (the best of
    the two), so that the ratio compares figures taken under the same load on a shared machine."""
    peaks = [matmul_peak(device=device, dtype=dtype)["gflops"]] if with_matmul_peak else []
    model, config = build(config_name, device, dtype, compile)
    inputs = random_cells(config, batch, device)
    length = inputs["gene_ids"].shape[1]
    with torch.inference_mode():
        warm = inputs if warmup_full else {k: v[:1] for k, v in inputs.items()}
        model(**warm)
        _sync(device)

        def step():
            model(**inputs).cell_embeds.sum().item()

        seconds, repeats = best_time(step, min_repeats=1, min_seconds=min_seconds)
    flops = forward_flops(config, batch, length)
    out = {
        "config": config_name, "batch": batch, "tokens_per_cell": length, "device": device, "dtype": dtype,
        "compile": compile, "seconds": round(seconds, 4), "repeats": repeats,
        "cells_per_s": round(batch / seconds, 2), "forward_gflop": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / seconds / 1e9, 1),
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "torch_threads": torch.get_num_threads(),
    }
    if with_matmul_peak:
        peaks.append(matmul_peak(device=device, dtype=dtype)["gflops"])
        out["matmul_peak_gflops"] = max(peaks)
        out["fraction_of_matmul_peak"] = round(out["achieved_gflops"] / max(peaks), 3)
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def matmul_peak(n: int = 4096, device: str = "cpu", dtype: str = "float32", repeats: int = 5) -> dict:
    """The machine's measured matmul FLOP/s: best of `repeats` n×n @ n×n products after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"n": n, "device": device, "dtype": dtype, "gflops": round(2 * n**3 / min(times) / 1e9, 1),
            "torch_threads": torch.get_num_threads()}
