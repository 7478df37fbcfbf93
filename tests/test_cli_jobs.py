"""`scmmgpt annotate | embed | describe | generate` on the shipped PBMC file as it is (scaled `.X`, log-normalised
`.raw`), on a raw-count file whose genes differ from the model's (extra genes, missing genes, Ensembl IDs in var_names
with symbols in a var column), with --layer / --use-raw; outputs written atomically; one-line errors."""

import os
import shutil
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel, ScMMGPTModel
from modeling_scmmgpt.cli import main

from .conftest import TINY_LABEL_TEXTS
from .test_multimodal import tiny_config

TYPES = list(TINY_LABEL_TEXTS)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


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


@pytest.mark.parametrize("input_name", ["pbmc_file", "counts_file", "pbmc_path"])
def test_annotate_embed_describe_write_their_fields(request, model_dir, tmp_path, input_name):
    source = str(request.getfixturevalue(input_name))
    before = open(source, "rb").read()
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
    described = _read(out)
    assert described.obs["scmmgpt_description"].map(type).eq(str).all()
    assert described.uns["scmmgpt"]["job"] == "describe" and "decision" in described.uns["scmmgpt"]
    assert open(source, "rb").read() == before  # the input is never written


def test_the_shipped_pbmc_file_is_read_from_raw_and_said_so(model_dir, pbmc_path, tmp_path, capsys):
    out = tmp_path / "annotated.h5ad"
    assert main(["annotate", str(model_dir), pbmc_path, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "from .raw (.X holds scaled values)" in err and "log1p-normalised values: used as they are" in err
    annotated = _read(out)
    assert annotated.uns["scmmgpt"]["source"] == ".raw" and annotated.uns["scmmgpt"]["method"] == "retrieval"
    assert annotated.X.shape == (700, 765) and annotated.raw is not None  # everything else is kept
    assert list(annotated.uns["scmmgpt"]["labels"]) == TYPES


def test_layer_and_use_raw_choose_the_matrix(model_dir, pbmc, tmp_path, capsys):
    counts = np.round(np.expm1(pbmc.raw.X[:10].toarray()) * 2).astype(np.float32)
    adata = anndata.AnnData(X=pbmc.X[:10].copy(), var=pbmc.var.copy(), layers={"counts": counts})
    path = tmp_path / "layered.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    assert main(["embed", str(model_dir), str(path), "-o", str(out)]) == 2
    assert "--layer NAME" in capsys.readouterr().err
    assert main(["embed", str(model_dir), str(path), "-o", str(out), "--layer", "counts"]) == 0
    assert "layers['counts']" in capsys.readouterr().err and _read(out).uns["scmmgpt"]["value_kind"] == "counts"
    assert main(["embed", str(model_dir), str(path), "-o", str(out), "--use-raw"]) == 2
    assert "no .raw" in capsys.readouterr().err


def test_a_failed_write_leaves_no_output_and_no_temporary_file(model_dir, pbmc_file, tmp_path, monkeypatch, capsys):
    import anndata.io

    def broken(*args, **kwargs):
        raise ValueError("disk full")

    monkeypatch.setattr(anndata.io, "write_elem", broken)
    out = tmp_path / "out" / "embedded.h5ad"
    assert main(["embed", str(model_dir), str(pbmc_file), "-o", str(out)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert os.listdir(out.parent) == []


def test_generate_writes_pseudo_cells_over_the_models_genes(model_dir, tmp_path, pbmc):
    out = tmp_path / "generated.h5ad"
    assert main(["generate", str(model_dir), "cell type: CD14-positive monocyte.", "cell type: B cell.", "-n", "4",
                 "-o", str(out)]) == 0
    cells = _read(out)
    assert cells.shape == (8, pbmc.raw.n_vars) and list(cells.var_names) == list(pbmc.raw.var_names)
    assert (cells.X >= 0).all() and list(cells.obs["prompt"][:4]) == ["cell type: CD14-positive monocyte."] * 4


def test_clear_errors(model_dir, pbmc_file, tmp_path, capsys):
    out = str(tmp_path / "o.h5ad")

    def error_of(*argv) -> str:
        try:
            status = main(list(argv))
        except SystemExit as stop:  # argparse's own checks: its usage line, then the error
            status = stop.code
        assert status == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and "error:" in err.splitlines()[-1], err
        return err.splitlines()[-1]

    assert "no such file" in error_of("annotate", str(model_dir), str(tmp_path / "missing.h5ad"), "-o", out)
    (tmp_path / "cells.csv").write_text("a,b\n1,2\n")
    assert "expected an AnnData .h5ad" in error_of("embed", str(model_dir), str(tmp_path / "cells.csv"), "-o", out)
    (tmp_path / "broken.h5ad").write_bytes(b"not hdf5 at all")
    assert "not a readable .h5ad" in error_of("embed", str(model_dir), str(tmp_path / "broken.h5ad"), "-o", out)
    alien = tmp_path / "alien.h5ad"
    anndata.AnnData(X=np.ones((3, 2), dtype=np.float32), var=pd.DataFrame(index=["FOO1", "BAR2"])).write_h5ad(alien)
    assert "none of the 2 genes" in error_of("annotate", str(model_dir), str(alien), "-o", out)
    assert "not a saved model folder" in error_of("embed", str(tmp_path), str(alien), "-o", out)
    assert "is the input file" in error_of("embed", str(model_dir), str(pbmc_file), "-o", str(pbmc_file))
    (tmp_path / "folder.h5ad").mkdir()
    assert "is a folder" in error_of("embed", str(model_dir), str(pbmc_file), "-o", str(tmp_path / "folder.h5ad"))
    assert "must be an .h5ad" in error_of("embed", str(model_dir), str(pbmc_file), "-o", str(tmp_path / "out.csv"))
    assert "positive integer" in error_of("embed", str(model_dir), str(pbmc_file), "-o", out, "--batch-size", "0")
    assert "non-empty string" in error_of("generate", str(model_dir), "", "-o", out)
    assert "positive integer" in error_of("generate", str(model_dir), "cell type: B cell.", "-n", "0", "-o", out)
    assert not os.path.exists(out)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])


def test_wrong_model_kinds_and_broken_folders_get_one_line_errors(model_dir, pbmc, pbmc_file, tmp_path, capsys):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    config = tiny_config(len(processor.feature_extractor), len(processor.tokenizer))
    ScMMGPTModel(config).save_pretrained(tmp_path / "stage1")
    processor.save_pretrained(tmp_path / "stage1")
    ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=len(processor.feature_extractor))).save_pretrained(
        tmp_path / "encoder")
    processor.feature_extractor.save_pretrained(tmp_path / "encoder")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").unlink()
    out = str(tmp_path / "o.h5ad")
    capsys.readouterr()
    cases = [
        (["describe", str(tmp_path / "stage1")], "cell descriptions needs a stage2 model; this is a stage1 model"),
        (["annotate", str(tmp_path / "encoder")], "cell type annotation needs a stage2 or stage1 or classifier model"),
        (["embed", str(broken)], "cannot load the model folder"),
    ]
    for argv, message in cases:
        assert main(argv + [str(pbmc_file), "-o", out]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and err.count("\n") == 0, err
    # the kinds that can do a job do it: a stage-1 folder annotates by retrieval and embeds, an encoder embeds
    assert main(["annotate", str(tmp_path / "stage1"), str(pbmc_file), "-o", out, "--labels", "B cell", "T cell"]) == 0
    assert main(["embed", str(tmp_path / "encoder"), str(pbmc_file), "-o", out]) == 0
    assert _read(out).obsm["X_scmmgpt"].shape == (20, 32)


def test_cells_with_no_known_gene_get_no_label_or_description(model_dir, pbmc, tmp_path, capsys):
    counts = np.round(np.expm1(pbmc.raw.X[:6].toarray()) * 2).astype(np.float32)
    counts[[0, 3]] = 0
    path, out = tmp_path / "zeros.h5ad", tmp_path / "out.h5ad"
    anndata.AnnData(X=counts, var=pbmc.raw.var.copy()).write_h5ad(path)
    with pytest.warns(UserWarning, match="2 of 6 cells have no expressed gene"):
        assert main(["annotate", str(model_dir), str(path), "-o", str(out)]) == 0
    labels = _read(out).obs["scmmgpt_cell_type"]
    assert labels.isna().tolist() == [True, False, False, True, False, False]
    assert np.isnan(_read(out).obsm["scmmgpt_cell_type_scores"][[0, 3]]).all()
    with pytest.warns(UserWarning, match="2 of 6 cells"):
        assert main(["describe", str(model_dir), str(path), "-o", str(out), "--max-new-tokens", "3"]) == 0
    texts = _read(out).obs["scmmgpt_description"].tolist()
    assert texts[0] == texts[3] == "" and all(texts[i] for i in (1, 2, 4, 5))
