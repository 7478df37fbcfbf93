"""Peak memory of `scmmgpt embed` and `scmmgpt annotate` against the number of cells: the jobs read a backed `.h5ad`
chunk by chunk and keep only what they return, so peak RSS should stay flat from 20k to 200k cells.

    python benchmarks/bench_jobs_scale.py --sizes 20000 200000 --json out.json

Input: seeded synthetic counts over PBMC's 765 genes (each expressed with p = 0.1, sparse CSR on disk); model: the
tiny stage-2 config of `bench_model` with random weights (memory of the path, not of a big model's weights). Each
command runs as its own child of a fresh wrapper process, whose `RUSAGE_CHILDREN` peak is that command's alone.
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
CHUNK = 20_000  # cells generated at a time (the dense random draw of a chunk is the big temporary)


def write_cells(path: str, n_cells: int, genes: list[str], seed: int = 0):
    """An `.h5ad` of `n_cells` synthetic count cells (generated chunk by chunk, written as one CSR matrix)."""
    import anndata
    import numpy as np
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, n_cells, CHUNK):
        rows = min(CHUNK, n_cells - start)
        mask = rng.random((rows, len(genes))) < GENE_P
        parts.append(sparse.csr_matrix(np.where(mask, rng.geometric(0.3, mask.shape), 0).astype(np.float32)))
    matrix = sparse.vstack(parts, format="csr")
    obs = pd.DataFrame(index=[f"cell_{i}" for i in range(n_cells)])
    anndata.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


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
            write_cells(cells, n, genes)
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
