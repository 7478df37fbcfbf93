"""Big inputs at flat memory: `scmmgpt embed` and `annotate` read a backed `.h5ad` chunk by chunk and keep only what
they return, so ten times the cells must not cost much more memory (benchmarks/bench_jobs_scale.py measures 20k vs
200k cells, and 1M with `make bench-jobs-1m`; the slow test here runs 2k vs 20k)."""

import anndata
import numpy as np
import pytest
from scipy import sparse

from benchmarks import bench_jobs_scale
from benchmarks.bench_jobs_scale import run, synthetic_chunks, write_cells


def test_chunked_writer_gives_the_cells_of_one_in_memory_matrix(tmp_path, monkeypatch):
    """The 1M-cell input is written chunk by chunk; read back as the jobs read it (backed, in row chunks), it holds
    exactly the generated cells, across a partial last chunk."""
    from modeling_scmmgpt import ScMMGPTCellTokenizer
    from modeling_scmmgpt.inputs_scmmgpt import read_cells

    monkeypatch.setattr(bench_jobs_scale, "CHUNK", 300)
    genes = [f"G{i}" for i in range(40)]
    path = str(tmp_path / "cells.h5ad")
    write_cells(path, 1000, genes, seed=3)
    expected = sparse.vstack(list(synthetic_chunks(1000, genes, seed=3)), format="csr")
    assert expected.shape == (1000, 40) and expected.nnz > 3000
    inputs = read_cells(path, ScMMGPTCellTokenizer(gene_names=genes))
    assert inputs.gene_names == genes and inputs.cell_ids[-1] == "cell_999" and inputs.value_kind == "counts"
    read = sparse.vstack([chunk for _, chunk in inputs.chunks(128)], format="csr")
    assert read.dtype == np.float32 and read.shape == expected.shape and (read != expected).nnz == 0
    assert (anndata.read_h5ad(path).X != expected).nnz == 0  # and anndata reads it whole


@pytest.mark.slow
def test_embed_and_annotate_peak_memory_is_flat_in_the_number_of_cells():
    rows = run([2_000, 20_000])
    for job in ("embed", "annotate"):
        small, large = (r["peak_rss_mb"] for r in rows if r["job"] == job)
        assert large <= 1.5 * small, f"{job}: {large:.0f} MB on 20k cells vs {small:.0f} MB on 2k"
