"""`scmmgpt demo`: the smallest real end-to-end path on the shipped PBMC cells (grows into the full demo)."""

import argparse
import os
import time
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scmmgpt demo", description=__doc__)
    parser.add_argument("--output-dir", default="demo_output")
    args = parser.parse_args(argv)

    import anndata
    import scanpy
    import torch

    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel, ScMMGPTCellTokenizer

    path = os.path.join(os.path.dirname(scanpy.__file__), "datasets", "10x_pbmc68k_reduced.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(path)
    print(f"cells: {adata.n_obs} PBMCs × {adata.raw.n_vars} genes from {path}")
    tokenizer = ScMMGPTCellTokenizer(gene_names=list(adata.raw.var_names), max_genes=256, normalize=False)
    start = time.perf_counter()
    batch = tokenizer(adata, use_raw=True, return_tensors="pt")
    print(f"tokenised in {time.perf_counter() - start:.2f}s: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items()))
    torch.manual_seed(0)
    model = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=len(tokenizer), max_genes=256)).eval()
    with torch.inference_mode():
        out = model(**batch)
    print(f"cell embeddings (untrained tiny encoder): {tuple(out.cell_embeds.shape)}")
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(os.path.join(args.output_dir, "cell_encoder"))
    tokenizer.save_pretrained(os.path.join(args.output_dir, "cell_encoder"))
    print(f"saved the encoder and its tokenizer to {args.output_dir}/cell_encoder")
    return 0
