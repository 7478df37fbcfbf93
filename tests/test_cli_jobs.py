"""`scmmgpt annotate | embed | describe | generate` on the shipped PBMC file and on a raw-count file whose genes differ
from the model's (extra genes, missing genes, Ensembl IDs in var_names with symbols in a var column)."""

import copy
import json
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from modeling_scmmgpt import ScMMGPTCellTokenizer, ScMMGPTForConditionalGeneration, ScMMGPTProcessor
from modeling_scmmgpt.cli import main

from .test_multimodal import tiny_config

TYPES = ["Dendritic", "CD14+ Monocyte", "CD19+ B"]


@pytest.fixture(scope="module")
def model_dir(pbmc, minilm_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=64, normalize=False)
    processor = ScMMGPTProcessor(cell_tokenizer, copy.deepcopy(minilm_tokenizer), num_query_tokens=4)
    torch.manual_seed(0)
    model = ScMMGPTForConditionalGeneration(tiny_config(len(cell_tokenizer), len(processor.tokenizer)))
    model.set_cell_token_ids(processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "label_texts.json").write_text(json.dumps({t: f"cell type: {t}." for t in TYPES}))
    return folder


@pytest.fixture(scope="module")
def pbmc_file(pbmc, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pbmc.h5ad"
    small = anndata.AnnData(X=pbmc.raw.X[:20].copy(), obs=pbmc.obs.iloc[:20].copy(), var=pbmc.raw.var.copy())
    small.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def counts_file(pbmc, tmp_path_factory):
    """Raw counts over a different gene set: 600 of the model's genes (165 missing), 50 genes it does not know,
    indexed by made-up Ensembl IDs with the symbols in var['feature_name'] (as CELLxGENE writes them)."""
    rng = np.random.default_rng(0)
    genes = list(pbmc.raw.var_names[:600]) + [f"NOVEL{i}" for i in range(50)]
    counts = sparse.csr_matrix(rng.poisson(0.8, (15, len(genes))).astype(np.float32))
    var = pd.DataFrame({"feature_name": genes}, index=[f"ENSG{i:011d}" for i in range(len(genes))])
    path = tmp_path_factory.mktemp("data") / "counts.h5ad"
    anndata.AnnData(X=counts, var=var).write_h5ad(path)
    return path


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(path)


@pytest.mark.parametrize("input_name", ["pbmc_file", "counts_file"])
def test_annotate_embed_describe_write_their_fields(request, model_dir, tmp_path, input_name):
    source = str(request.getfixturevalue(input_name))
    out = tmp_path / "out.h5ad"
    assert main(["annotate", str(model_dir), source, "-o", str(out)]) == 0
    annotated = _read(out)
    assert set(annotated.obs["scmmgpt_cell_type"]) <= set(TYPES)
    assert annotated.obsm["scmmgpt_cell_type_scores"].shape == (annotated.n_obs, 3)
    assert main(["annotate", str(model_dir), source, "-o", str(out), "--method", "likelihood",
                 "--labels", "T cell", "B cell"]) == 0
    assert set(_read(out).obs["scmmgpt_cell_type"]) <= {"T cell", "B cell"}
    assert main(["embed", str(model_dir), source, "-o", str(out)]) == 0
    embedded = _read(out)
    assert embedded.obsm["X_scmmgpt"].shape == (embedded.n_obs, 32) and np.isfinite(embedded.obsm["X_scmmgpt"]).all()
    assert main(["describe", str(model_dir), source, "-o", str(out), "--max-new-tokens", "3"]) == 0
    assert _read(out).obs["scmmgpt_description"].map(type).eq(str).all()


def test_generate_writes_pseudo_cells_over_the_models_genes(model_dir, tmp_path, pbmc):
    out = tmp_path / "generated.h5ad"
    assert main(["generate", str(model_dir), "cell type: CD14-positive monocyte.", "cell type: B cell.", "-n", "4",
                 "-o", str(out)]) == 0
    cells = _read(out)
    assert cells.shape == (8, pbmc.raw.n_vars) and list(cells.var_names) == list(pbmc.raw.var_names)
    assert (cells.X >= 0).all() and list(cells.obs["prompt"][:4]) == ["cell type: CD14-positive monocyte."] * 4


def test_clear_errors(model_dir, tmp_path, capsys):
    out = str(tmp_path / "o.h5ad")
    assert main(["annotate", str(model_dir), str(tmp_path / "missing.h5ad"), "-o", out]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "cells.csv").write_text("a,b\n1,2\n")
    assert main(["embed", str(model_dir), str(tmp_path / "cells.csv"), "-o", out]) == 2
    assert "expected an AnnData .h5ad" in capsys.readouterr().err
    (tmp_path / "broken.h5ad").write_bytes(b"not hdf5 at all")
    assert main(["embed", str(model_dir), str(tmp_path / "broken.h5ad"), "-o", out]) == 2
    assert "not a readable .h5ad" in capsys.readouterr().err
    alien = tmp_path / "alien.h5ad"
    anndata.AnnData(X=np.ones((3, 2), dtype=np.float32), var=pd.DataFrame(index=["FOO1", "BAR2"])).write_h5ad(alien)
    assert main(["annotate", str(model_dir), str(alien), "-o", out]) == 2
    assert "none of the 2 genes" in capsys.readouterr().err
    assert main(["embed", str(tmp_path), str(alien), "-o", out]) == 2
    assert "not a saved model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
