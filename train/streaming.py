"""Training-time reading of built cells: lazy parquet streaming, rank sharding, buffer shuffling, and the cell
tokenizer applied to stored rows on the fly.

`stream_dataset` reads the shards of a folder written by `data.write_dataset` as a `datasets.IterableDataset` (one row
group per shard in memory at a time, so memory stays flat however many cells the corpus holds). Tokenisation
happens per batch in the collators (`collators.py`) through `rows_to_cell_inputs`, which rebuilds each row's sparse
expression, normalises count rows and calls `ScMMGPTCellTokenizer`.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from .data import ROW_GROUP_CELLS, shard_files
from .sources import COUNTS, LOG_NORMALIZED

N_SPECIAL = 3  # `<pad>`, `<cls>`, `<eoc>` come before the genes in the cell tokenizer's vocabulary


def stream_dataset(out_dir, split: str = "train", *, shuffle: bool = True, seed: int = 0, buffer_size: int = 10_000,
                   rank: int | None = None, world_size: int | None = None):
    """A lazily-read `datasets.IterableDataset` of one split of a built folder; each parquet shard is a data source.

    Args:
        out_dir: a folder written by `write_dataset` / `scmmgpt build-dataset`.
        shuffle: shuffle shard order and rows through a `buffer_size` buffer, seeded by `seed` (call
            `.set_epoch(epoch)` on the result for a new order each epoch).
        rank, world_size: this process's share under `datasets.distributed.split_dataset_by_node`: whole shards per
            rank when the shard count divides by `world_size`, else every `world_size`-th row; ranks are disjoint and
            together cover the split.

    Memory: one row group (`ROW_GROUP_CELLS` cells) per shard being read (at most 10 at once while shuffling) plus
    the shuffle buffer, whatever the corpus size.
    """
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    # our own reader rather than `load_dataset("parquet", streaming=True)`, which buffers a whole shard in memory;
    # no `features=`: the parquet rows are typed already, and re-encoding every row would halve the throughput
    stream = IterableDataset.from_generator(
        _read_shards, gen_kwargs={"files": shard_files(out_dir, split)})
    if world_size is not None and world_size > 1:
        if rank is None or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    if shuffle:
        stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
    return stream


def _read_shards(files: list[str]):
    """Rows of parquet shards, one row group at a time; `gene_ids` / `expression` come as numpy arrays.

    Numpy rather than lists: a list row is ~600 small Python objects, and a shuffle buffer replacing rows at random
    fragments the interpreter's small-object arenas, so resident memory would creep up with the number of rows read.
    """
    import pyarrow.parquet as pq

    for path in files:
        with pq.ParquetFile(path, pre_buffer=False) as shard:  # pre-buffering caches every row group read
            for batch in shard.iter_batches(batch_size=ROW_GROUP_CELLS):
                yield from _batch_rows(batch)


def _batch_rows(batch) -> list[dict]:
    """A record batch → row dicts, list columns split into per-row numpy arrays."""
    lists = [f.name for f in batch.schema if str(f.type).startswith(("list", "large_list"))]
    rows = batch.drop_columns(lists).to_pylist()
    for name in lists:
        column = batch.column(name)
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)
        for row, start, stop in zip(rows, offsets[:-1], offsets[1:]):
            row[name] = values[start:stop].copy()  # a view would keep the whole batch alive in the buffer
    return rows


def rows_to_matrix(rows: list[dict], n_genes: int) -> sparse.csr_matrix:
    """Stored rows → CSR of shape (len(rows), n_genes) whose columns are vocabulary gene ids minus the specials."""
    lengths = [len(r["gene_ids"]) for r in rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.asarray(r["gene_ids"], dtype=np.int64) for r in rows]) - N_SPECIAL if rows else []
    data = np.concatenate([np.asarray(r["expression"], dtype=np.float32) for r in rows]) if rows else []
    return sparse.csr_matrix((data, indices, indptr), shape=(len(rows), n_genes))


def log_normalized(rows: list[dict], matrix: sparse.csr_matrix, target_sum: float = 1e4) -> sparse.csr_matrix:
    """log1p(x / total_counts · target_sum) for count rows; log-normalised rows are kept as stored.

    The library size is the row's stored `total_counts` (all the file's genes), the same value the tokenizer would
    compute on the original file.
    """
    kinds = [r.get("value_kind", COUNTS) for r in rows]
    unknown = set(kinds) - {COUNTS, LOG_NORMALIZED}
    if unknown:
        raise ValueError(f"unknown value_kind {sorted(unknown)}; expected {COUNTS!r} or {LOG_NORMALIZED!r}")
    totals = np.array([r.get("total_counts") or 0.0 for r in rows], dtype=np.float64)
    is_counts = np.array([k == COUNTS for k in kinds], dtype=bool)
    scale = np.ones(len(rows))
    scale[is_counts] = np.divide(target_sum, totals[is_counts], out=np.zeros(is_counts.sum()),
                                 where=totals[is_counts] > 0)
    out = sparse.csr_matrix(sparse.diags(scale) @ matrix.astype(np.float64))
    row_of_value = np.repeat(np.arange(len(rows)), np.diff(out.indptr))
    out.data = np.where(is_counts[row_of_value], np.log1p(out.data), out.data)
    return out


def rows_to_cell_inputs(rows: list[dict | None], cell_tokenizer, return_tensors: str = "pt") -> dict:
    """Tokenise stored cells; a `None` row gives an all-padding cell (`<cls>` only).

    Returns:
        `gene_ids` (B × L int64), `expression_values` (B × L float32), `cell_attention_mask` (B × L int64), where
        L = 1 + the most genes kept in any cell of the batch (at least 1).
    """
    present = [i for i, r in enumerate(rows) if r is not None]
    real = [rows[i] for i in present]
    n_genes = len(cell_tokenizer.gene_names)
    matrix = log_normalized(real, rows_to_matrix(real, n_genes), cell_tokenizer.target_sum)
    # only the batch's own genes go to the tokenizer: it maps gene names to ids one by one
    used = np.unique(matrix.indices)
    if used.size == 0:
        used = np.array([0])
    encoded = cell_tokenizer(matrix[:, used], gene_names=[cell_tokenizer.gene_names[j] for j in used],
                             normalize=False, return_tensors="np")
    batch, length = len(rows), encoded["gene_ids"].shape[1]
    gene_ids = np.full((batch, length), cell_tokenizer.pad_token_id, dtype=np.int64)
    values = np.full((batch, length), cell_tokenizer.pad_value, dtype=np.float32)
    mask = np.zeros((batch, length), dtype=np.int64)
    gene_ids[:, 0], values[:, 0], mask[:, 0] = cell_tokenizer.cls_token_id, cell_tokenizer.cls_value, 1
    gene_ids[present], values[present], mask[present] = (
        encoded["gene_ids"], encoded["expression_values"], encoded["attention_mask"])
    out = {"gene_ids": gene_ids, "expression_values": values, "cell_attention_mask": mask}
    return _to_tensors(out) if return_tensors == "pt" else out


def cell_input_batches(rows, cell_tokenizer, batch_size: int = 64, device=None):
    """`rows_to_cell_inputs` over built rows (a list or `datasets.Dataset`), `batch_size` at a time, as tensors on
    `device`: for scoring a model on stored cells."""
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        yield {k: v.to(device) for k, v in rows_to_cell_inputs(chunk, cell_tokenizer).items()}


def _to_tensors(arrays: dict) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


__all__ = ["cell_input_batches", "log_normalized", "rows_to_cell_inputs", "rows_to_matrix", "stream_dataset"]
