"""Peak memory of building and streaming cells as the corpus grows (the data layer's scale check).

For each size (default 50k and 200k cells × 20k genes, sparse integer counts) this script writes a synthetic `.h5ad`,
then, each in a fresh process so that peak RSS is that step's own:
  build  — `write_dataset` (chunked reading, parquet shards);
  stream — `stream_dataset` with a 10k-row shuffle buffer, tokenising every batch of 64 on the fly.
Peak RSS comes from `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the step's process. Linux carries `ru_maxrss`
across fork + exec, so the synthetic file is generated in a child as well: the parent stays small and cannot inflate
the figures. Flat memory means the 200k figures match the 50k ones.

    python benchmarks/bench_data_scale.py [--sizes 50000 200000] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

N_GENES = 20_000
GENES_PER_CELL = 300  # non-zero genes per cell, a typical droplet cell after QC
LABELS = ("B cell", "T cell", "natural killer cell", "CD14-positive monocyte", "dendritic cell")


def write_synthetic_h5ad(path: str, n_cells: int, n_genes: int = N_GENES, per_cell: int = GENES_PER_CELL,
                         seed: int = 0):
    """A CSR h5ad of integer counts: each cell expresses `per_cell` genes, one drawn from each of `per_cell` equal
    blocks of the gene axis (sorted, distinct indices without a per-row loop)."""
    import anndata
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    block = n_genes // per_cell
    indices = (np.arange(per_cell) * block + rng.integers(0, block, size=(n_cells, per_cell))).astype(np.int32)
    data = (rng.geometric(0.3, size=n_cells * per_cell)).astype(np.float32)
    indptr = np.arange(0, n_cells * per_cell + 1, per_cell, dtype=np.int64)
    x = sparse.csr_matrix((data, indices.ravel(), indptr), shape=(n_cells, n_genes))
    obs = pd.DataFrame({"cell_type": pd.Categorical(np.array(LABELS)[rng.integers(0, len(LABELS), n_cells)]),
                        "donor_id": pd.Categorical([f"donor{i % 8}" for i in range(n_cells)])},
                       index=[f"cell{i}" for i in range(n_cells)])
    adata = anndata.AnnData(x, obs=obs)
    adata.var_names = [f"GENE{i}" for i in range(n_genes)]
    adata.write_h5ad(path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_generate(h5ad: str, n_cells: str) -> dict:
    start = time.perf_counter()
    write_synthetic_h5ad(h5ad, int(n_cells))
    return {"seconds": time.perf_counter() - start}


def child_build(h5ad: str, out: str) -> dict:
    from scmmgpt_train.data import write_dataset

    start = time.perf_counter()
    info = write_dataset(h5ad, out, [f"GENE{i}" for i in range(N_GENES)], progress=False)
    return {"cells": info["n_cells"], "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def child_stream(out: str) -> dict:
    from scmmgpt_train.data import load_cell_tokenizer
    from scmmgpt_train.streaming import rows_to_cell_inputs, stream_dataset

    tokenizer = load_cell_tokenizer(out)
    start, cells, batch = time.perf_counter(), 0, []
    for row in stream_dataset(out, seed=0, buffer_size=10_000):
        batch.append(row)
        if len(batch) == 64:
            cells += rows_to_cell_inputs(batch, tokenizer, return_tensors="np")["gene_ids"].shape[0]
            batch = []
    if batch:
        cells += len(batch)
    return {"cells": cells, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"step {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(n_cells: int, work_dir: str) -> dict:
    h5ad, out = os.path.join(work_dir, f"cells_{n_cells}.h5ad"), os.path.join(work_dir, f"built_{n_cells}")
    generate_s = run_child("generate", h5ad, str(n_cells))["seconds"]
    build, stream = run_child("build", h5ad, out), run_child("stream", out)
    assert build["cells"] == stream["cells"] == n_cells, (build, stream)
    return {
        "n_cells": n_cells, "n_genes": N_GENES, "genes_per_cell": GENES_PER_CELL,
        "h5ad_mb": os.path.getsize(h5ad) / 2**20, "generate_s": generate_s,
        "build_s": build["seconds"], "build_peak_rss_mb": build["peak_rss_mb"],
        "stream_s": stream["seconds"], "stream_peak_rss_mb": stream["peak_rss_mb"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--work-dir", help="where the synthetic files go (default: a temporary folder)")
    parser.add_argument("--json", default="benchmarks/results/data_scale.json", help="where to write the results")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        step, *rest = args.child
        print(json.dumps({"generate": child_generate, "build": child_build, "stream": child_stream}[step](*rest)))
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
        runs = []
        for n in args.sizes:
            runs.append(measure(n, work_dir))
            print(json.dumps(runs[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"runs": runs, "python": sys.version.split()[0]}, f, indent=1)
    print(f"{'cells':>8} {'build s':>8} {'build MB':>9} {'stream s':>9} {'stream MB':>10}")
    for r in runs:
        print(f"{r['n_cells']:>8} {r['build_s']:>8.1f} {r['build_peak_rss_mb']:>9.0f} {r['stream_s']:>9.1f} "
              f"{r['stream_peak_rss_mb']:>10.0f}")


if __name__ == "__main__":
    main()
