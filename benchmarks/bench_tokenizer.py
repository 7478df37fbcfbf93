"""Cell tokenizer throughput against a plain per-cell implementation of scGPT's algorithm.

The input is a seeded synthetic count matrix (default 50k cells × 20k genes, each gene expressed with probability
0.1, so ~2k non-zero genes per cell; geometric counts, so many ties as in real UMI data). The tokenizer encodes the
whole matrix; the reference loop (`reference_tokenize`) runs on the first `reference_cells` cells and its per-cell time
is extrapolated to the whole matrix (it is linear in cells). Both outputs are compared on those cells. The tokenizer is
timed as users get it (all usable cores, int64 ids), on one thread, and with int32 ids and mask.
"""

import time

import numpy as np
from scipy import sparse

from .common import best_time

N_GENES = 20_000
EXPRESSED_FRACTION = 0.1  # → ~2k non-zero genes per cell


def synthetic_counts(n_cells: int, n_genes: int = N_GENES, p: float = EXPRESSED_FRACTION, seed: int = 0,
                     chunk: int = 2000) -> sparse.csr_matrix:
    """Seeded CSR count matrix: each (cell, gene) expressed with probability `p`, counts ~ geometric(0.15)."""
    rng = np.random.default_rng(seed)
    indices, indptr, total = [], [np.zeros(1, np.int64)], 0
    for start in range(0, n_cells, chunk):
        n = min(chunk, n_cells - start)
        rows, cols = np.nonzero(rng.random((n, n_genes), dtype=np.float32) < p)
        indices.append(cols.astype(np.int32))
        indptr.append(total + np.cumsum(np.bincount(rows, minlength=n)))
        total += cols.size
    data = rng.geometric(0.15, size=total).astype(np.float32)
    return sparse.csr_matrix((data, np.concatenate(indices), np.concatenate(indptr)), shape=(n_cells, n_genes))


def reference_tokenize(matrix: sparse.csr_matrix, vocab_ids: np.ndarray, max_genes: int, binned: bool,
                       n_bins: int = 51, target_sum: float = 1e4, pad_id: int = 0, cls_id: int = 1,
                       pad_value: float = -2.0):
    """scGPT's algorithm as scGPT writes it, one cell at a time: a dense expression row (scGPT densifies the layer),
    normalise + log1p, non-zero filter, `np.quantile` edges + `np.digitize` (binned mode), the top `max_genes` by
    value (a stable sort on the float32 value, the output's precision, so ties keep gene order; scGPT samples at
    random here instead), `<cls>` in front, pad."""
    n_genes = matrix.shape[1]
    cells_ids, cells_values = [], []
    for i in range(matrix.shape[0]):
        row = np.zeros(n_genes)
        lo, hi = matrix.indptr[i], matrix.indptr[i + 1]
        row[matrix.indices[lo:hi]] = matrix.data[lo:hi]
        total = row.sum()
        if total > 0:
            row = np.log1p(row * (target_sum / total))
        nonzero = np.nonzero(row)[0]
        expression, genes = row[nonzero], vocab_ids[nonzero]
        values = expression
        if binned and expression.size:
            edges = np.quantile(expression, np.linspace(0, 1, n_bins - 1))
            values = np.digitize(expression, edges).astype(np.float64)
        order = np.argsort(-expression.astype(np.float32), kind="stable")[:max_genes]
        cells_ids.append(np.concatenate([[cls_id], genes[order]]))
        cells_values.append(np.concatenate([[0.0], values[order]]))
    length = max(len(ids) for ids in cells_ids)
    gene_ids = np.full((len(cells_ids), length), pad_id, dtype=np.int64)
    expression_values = np.full((len(cells_ids), length), pad_value, dtype=np.float32)
    attention_mask = np.zeros((len(cells_ids), length), dtype=np.int64)
    for i, (ids, values) in enumerate(zip(cells_ids, cells_values)):
        gene_ids[i, : len(ids)], expression_values[i, : len(ids)], attention_mask[i, : len(ids)] = ids, values, 1
    return {"gene_ids": gene_ids, "expression_values": expression_values, "attention_mask": attention_mask}


def run(mode: str = "continuous", n_cells: int = 50_000, reference_cells: int = 500, max_genes: int = 2048,
        seed: int = 0, repeats: int = 2, num_workers: int | None = None) -> dict:
    """Best of `repeats` timings of each side (the machine may be shared). The tokenizer runs as users get it (all
    usable cores, int64 ids and mask), then on one thread (`serial_*`) and with int32 ids and mask (`int32_*`)."""
    from modeling_scmmgpt import ScMMGPTCellTokenizer
    from modeling_scmmgpt.feature_extraction_scmmgpt import default_num_workers

    start = time.perf_counter()
    matrix = synthetic_counts(n_cells, seed=seed)
    generate_s = time.perf_counter() - start
    genes = [f"GENE{i}" for i in range(matrix.shape[1])]
    workers = default_num_workers() if num_workers is None else num_workers
    tokenizer = ScMMGPTCellTokenizer(gene_names=genes, max_genes=max_genes, input_value_mode=mode, num_workers=workers)

    def seconds(**options):
        return best_time(lambda: tokenizer(matrix, genes, **options), min_repeats=repeats, min_seconds=0)[0]

    tokenizer_s, serial_s, int32_s = seconds(), seconds(num_workers=1), seconds(ids_dtype="int32")

    subset = matrix[:reference_cells]
    vocab_ids = tokenizer.convert_genes_to_ids(genes)
    def reference_run():
        return reference_tokenize(subset, vocab_ids, max_genes, binned=mode == "binned", n_bins=tokenizer.n_bins,
                                  pad_value=tokenizer.pad_value)

    reference_s, _ = best_time(reference_run, min_repeats=3, min_seconds=0)
    reference = reference_run()

    # the same cells tokenised alone (the tokenizer pads to the longest cell of its call), by every variant
    variants = [tokenizer(subset, genes), tokenizer(subset, genes, num_workers=1),
                tokenizer(subset, genes, ids_dtype="int32")]
    identical = all(np.array_equal(np.asarray(v[k]), reference[k]) for v in variants for k in reference)
    reference_cells_s = reference_cells / reference_s
    rates = {name: n_cells / s for name, s in (("tokenizer", tokenizer_s), ("serial", serial_s), ("int32", int32_s))}
    return {
        "mode": mode, "n_cells": n_cells, "n_genes": matrix.shape[1], "max_genes": max_genes,
        "mean_nonzero_per_cell": round(matrix.nnz / n_cells, 1), "matrix_mb": round(
            (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes) / 2**20, 1),
        "generate_s": round(generate_s, 2), "num_workers": workers, "tokenizer_s": round(tokenizer_s, 2),
        "tokenizer_cells_per_s": round(rates["tokenizer"], 1),
        "serial_cells_per_s": round(rates["serial"], 1), "int32_cells_per_s": round(rates["int32"], 1),
        "reference_cells": reference_cells, "reference_s": round(reference_s, 2),
        "reference_cells_per_s": round(reference_cells_s, 1),
        "speedup": round(rates["tokenizer"] / reference_cells_s, 2),
        "serial_speedup": round(rates["serial"] / reference_cells_s, 2),
        "int32_speedup": round(rates["int32"] / reference_cells_s, 2),
        "identical_to_reference": bool(identical),
    }
