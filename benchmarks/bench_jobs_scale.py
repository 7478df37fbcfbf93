"""Peak memory and cells/s of `scmmgpt embed` and `scmmgpt annotate` against the number of cells: the jobs read a
backed `.h5ad` chunk by chunk and keep only what they return, so peak RSS should stay flat from 20k to 1M cells.

    python benchmarks/bench_jobs_scale.py --sizes 20000 200000 --json out.json    # make bench-jobs
    python benchmarks/bench_jobs_scale.py --sizes 1000000 --json out_1m.json      # make bench-jobs-1m

Input: seeded synthetic counts over PBMC's 765 genes (each expressed with p = 0.1, sparse CSR on disk: ~0.63 GB for
1M cells), generated and written 20k cells at a time (the same cells as one in-memory write would give); model: the
tiny stage-2 config of `bench_model` with random weights (memory of the path, not of a big model's weights). Each
command runs as its own child of a fresh wrapper process, whose `RUSAGE_CHILDREN` peak is that command's alone; its
seconds include starting Python, loading the model and writing the output file.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GENE_P = 0.1
CHUNK = 20_000  # cells generated and written at a time


def synthetic_chunks(n_cells: int, genes: list[str], seed: int = 0):
    """Seeded synthetic counts (each gene expressed with p = `GENE_P`, geometric(0.3) counts), as float32 CSR
    chunks of at most `CHUNK` cells (the dense random draw of a chunk is the big temporary)."""
    import numpy as np
    from scipy import sparse

    rng = np.random.default_rng(seed)
    for start in range(0, n_cells, CHUNK):
        rows = min(CHUNK, n_cells - start)
        mask = rng.random((rows, len(genes))) < GENE_P
        yield sparse.csr_matrix(np.where(mask, rng.geometric(0.3, mask.shape), 0).astype(np.float32))


def write_cells(path: str, n_cells: int, genes: list[str], seed: int = 0):
    """An `.h5ad` of `synthetic_chunks`, written chunk by chunk (the CSR datasets are appended to), so that a million
    cells take no more memory than twenty thousand."""
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        write_elem(f, "obs", pd.DataFrame(index=[f"cell_{i}" for i in range(n_cells)]))
        write_elem(f, "var", pd.DataFrame(index=genes))
        for key in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            write_elem(f, key, {})
        for i, chunk in enumerate(synthetic_chunks(n_cells, genes, seed)):
            if i == 0:  # anndata writes sparse datasets resizable, so the next chunks append
                write_elem(f, "X", chunk)
            else:
                sparse_dataset(f["X"]).append(chunk)


def tiny_model_folder(folder: str) -> list[str]:
    """The bench_model tiny stage-2 model saved with its processor and label texts; returns its genes."""
    from benchmarks.bench_model import _generator, _parts

    adata, processor = _parts()
    model = _generator(processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    types = sorted(set(adata.obs["bulk_labels"]))
    with open(os.path.join(folder, "label_texts.json"), "w") as f:
        json.dump({t: f"cell type: {t}." for t in types}, f)
    return list(processor.feature_extractor.gene_names)


def peak_of(command: list[str]) -> tuple[float, float]:
    """(peak RSS MB, seconds) of `command` run as the only child of a fresh wrapper process."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.time(); "
               "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
               "assert code.returncode == 0, code.stderr.decode()[-2000:]; "
               "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.time() - t]))")
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    peak, seconds = json.loads(out.stdout.strip().splitlines()[-1])
    return peak, seconds


def run(sizes: list[int], jobs=("embed", "annotate"), batch_size: int = 256) -> list[dict]:
    cli = [sys.executable, "-m", "modeling_scmmgpt.cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="scmmgpt-jobs-scale-") as tmp:
        model = os.path.join(tmp, "model")
        genes = tiny_model_folder(model)
        for n in sizes:
            cells = os.path.join(tmp, f"cells_{n}.h5ad")
            start = time.time()
            write_cells(cells, n, genes)
            print(json.dumps({"wrote_cells": n, "write_s": round(time.time() - start, 1),
                              "input_mb": round(os.path.getsize(cells) / 2**20, 1)}), flush=True)
            for job in jobs:
                out = os.path.join(tmp, f"{job}_{n}.h5ad")
                peak, seconds = peak_of(cli + [job, model, cells, "-o", out, "--batch-size", str(batch_size)])
                rows.append({"job": job, "n_cells": n, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1),
                             "cells_per_s": round(n / seconds, 1), "input_mb": round(os.path.getsize(cells) / 2**20, 1)})
                print(json.dumps(rows[-1]), flush=True)
                os.unlink(out)
            os.unlink(cells)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    start = time.time()
    rows = run(args.sizes)
    result = {"runs": rows, "wall_s": round(time.time() - start, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
