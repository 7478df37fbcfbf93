"""Dataset building: exact sparse round trip, counts / log-normalised handling, streaming and rank sharding, splits,
bad inputs with clear errors, atomic writes, and (slow) bounded memory at scale."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from modeling_scmmgpt.feature_extraction_scmmgpt import ScMMGPTCellTokenizer
from scmmgpt_train.build_cli import build_dataset_main
from scmmgpt_train.data import (
    DataError,
    build_dataset,
    load_cell_tokenizer,
    load_dataset_dir,
    read_build_info,
    write_dataset,
)
from scmmgpt_train.ontology import UnmappedLabelsError
from scmmgpt_train.splits import split_dataset
from scmmgpt_train.streaming import rows_to_cell_inputs, rows_to_matrix, stream_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def counts_adata(n_cells=60, genes=None, seed=0, labels=("B cell", "T cell", "natural killer cell"), **obs):
    """A small AnnData of integer counts with CELLxGENE-like obs columns."""
    import anndata

    genes = list(genes or [f"G{i}" for i in range(40)])
    rng = np.random.default_rng(seed)
    x = sparse.random(n_cells, len(genes), density=0.3, format="csr", random_state=seed, dtype=np.float32)
    x.data = np.ceil(x.data * 20)
    frame = {"cell_type": [labels[i % len(labels)] for i in range(n_cells)], **obs}
    ad = anndata.AnnData(x, obs=pd.DataFrame(frame, index=[f"c{seed}_{i}" for i in range(n_cells)]))
    ad.var_names = genes
    ad.obs["tissue"] = rng.choice(["blood", "lung"], n_cells)
    return ad


def write_h5ad(ad, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.write_h5ad(path)
    return str(path)


@pytest.fixture(scope="module")
def built(pbmc_path):
    return build_dataset(pbmc_path, return_tokenizer=True)


# ---------------------------------------------------------------------------------------------------- building
def test_pbmc_rows_hold_labels_cl_ids_and_text(built, pbmc):
    ds, _ = built
    assert len(ds) == pbmc.n_obs == 700
    assert ds["cell_id"] == list(pbmc.obs_names)
    assert set(ds["value_kind"]) == {"log1p_normalized"}  # raw.X of this file is log-normalised, X is scaled
    assert all(ds["cell_type_ontology_term_id"]) and set(ds["cell_type"]) == set(pbmc.obs["bulk_labels"])
    row = ds[0]
    assert row["cell_type"] == "CD14+ Monocyte" and row["cell_type_ontology_term_id"] == "CL:0001054"
    assert row["text"].startswith("cell type: CD14-positive monocyte. A monocyte that expresses CD14")
    assert row["dataset_id"] == "10x_pbmc68k_reduced"
    assert json.loads(ds.info.description)["unmapped_labels"] == {}


def test_stored_sparse_expression_round_trips_exactly(built, pbmc):
    ds, tok = built
    rows = [ds[i] for i in range(len(ds))]
    assert all(np.all(np.diff(r["gene_ids"]) > 0) and np.all(np.asarray(r["expression"]) != 0) for r in rows)
    rebuilt = rows_to_matrix(rows, len(tok.gene_names)).toarray()
    # the vocabulary built from the file is its genes in order, so columns line up one to one
    assert tok.gene_names == list(pbmc.raw.var_names)
    original = pbmc.raw.X.toarray().astype(np.float32)
    assert rebuilt.dtype == np.float32 and np.array_equal(rebuilt, original)
    np.testing.assert_allclose(ds["total_counts"], original.sum(1, dtype=np.float64), rtol=1e-6)


def test_chunked_reading_gives_the_same_rows(built, pbmc_path):
    small_chunks = build_dataset(pbmc_path, chunk_cells=64)
    assert small_chunks["gene_ids"] == built[0]["gene_ids"] and small_chunks["expression"] == built[0]["expression"]


def test_counts_are_preferred_and_tokenise_like_the_original(tmp_path):
    ad = counts_adata()
    ad.layers["counts"] = ad.X.copy()
    ad.X = ad.X.multiply(1 / 7).tocsr()  # X holds something else; the counts layer must win
    path = write_h5ad(ad, tmp_path / "c.h5ad")
    vocab = ScMMGPTCellTokenizer(gene_names=list(ad.var_names[:30]) + ["EXTRA"])  # 10 genes unknown
    with pytest.warns(UserWarning, match="10 of 40 genes are not in the vocabulary"):
        ds = build_dataset(path, vocab)
    assert set(ds["value_kind"]) == {"counts"}
    assert read_build_info_of(ds)["sources"][0]["matrix"] == "layers/counts"
    # normalisation uses the library size over all the file's genes, as tokenising the original AnnData does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = vocab(ad, layer="counts", return_tensors="np")
    got = rows_to_cell_inputs(list(ds), vocab, return_tensors="np")
    assert np.array_equal(got["gene_ids"], expected["gene_ids"])
    np.testing.assert_allclose(got["expression_values"], expected["expression_values"], rtol=1e-6)


def read_build_info_of(ds):
    return json.loads(ds.info.description)


def test_files_concatenate_with_genes_aligned_to_the_vocabulary(tmp_path):
    a = counts_adata(genes=[f"G{i}" for i in range(40)], seed=1)
    b = counts_adata(genes=[f"G{i}" for i in reversed(range(10, 50))], seed=2)  # other order, other genes
    b.var["feature_name"] = list(b.var_names)
    b.var_names = [f"ENSG{i:011d}" for i in range(40)]  # Ensembl index: the symbol column must be chosen
    vocab = ScMMGPTCellTokenizer(gene_names=[f"G{i}" for i in range(50)])
    ds = build_dataset([write_h5ad(a, tmp_path / "a.h5ad"), write_h5ad(b, tmp_path / "b.h5ad")], vocab)
    assert len(ds) == 120 and set(ds["dataset_id"]) == {"a", "b"}
    rebuilt = rows_to_matrix(list(ds), 50).toarray()
    assert np.array_equal(rebuilt[:60, :40], a.X.toarray())
    assert np.array_equal(rebuilt[60:, 10:50], b.X.toarray()[:, ::-1])
    assert not rebuilt[:60, 40:].any() and not rebuilt[60:, :10].any()


def test_label_only_keeps_unmapped_cells_and_reports_them():
    ad = counts_adata(labels=("B cell", "Martian cell"))
    ds = build_dataset(ad, on_unmapped="label_only")
    assert len(ds) == 60
    martian = ds.select([i for i, label in enumerate(ds["cell_type"]) if label == "Martian cell"])
    assert len(martian) == 30 and set(martian["cell_type_ontology_term_id"]) == {""}
    assert set(martian["text"]) == {"cell type: Martian cell. Tissue: blood.", "cell type: Martian cell. Tissue: lung."}
    assert read_build_info_of(ds)["unmapped_labels"] == {"Martian cell": 30}


# ---------------------------------------------------------------------------------------------------- bad input
def test_unmapped_labels_fail_by_default():
    with pytest.raises(UnmappedLabelsError, match=r"AnnData\[0\].*'Martian cell' \(30 cells\)"):
        build_dataset(counts_adata(labels=("B cell", "Martian cell")))


def test_no_usable_label_column_names_the_file(tmp_path):
    ad = counts_adata()
    del ad.obs["cell_type"]
    path = write_h5ad(ad, tmp_path / "nolabel.h5ad")
    with pytest.raises(DataError, match=r"label_column is needed: .*nolabel\.h5ad has no usable cell-type label"):
        build_dataset(path)
    ad.obs["cell_type"] = "unknown"
    with pytest.raises(DataError, match=r"column 'cell_type' holds no labels"):
        build_dataset(write_h5ad(ad, tmp_path / "nolabel.h5ad"))


def test_duplicated_gene_names_name_the_file(tmp_path):
    ad = counts_adata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.var_names = ["G0", "G0"] + [f"G{i}" for i in range(2, 40)]
    path = write_h5ad(ad, tmp_path / "dup.h5ad")
    with pytest.raises(DataError, match=r"dup\.h5ad: duplicated gene names .*\['G0'\]"):
        build_dataset(path)


def test_counts_required_but_data_log_normalised(pbmc_path):
    with pytest.raises(DataError, match=r"10x_pbmc68k_reduced\.h5ad: raw counts are required.*raw/X: log1p"):
        build_dataset(pbmc_path, value_kind="counts")


def test_scaled_or_unlogged_data_is_refused(tmp_path):
    ad = counts_adata()
    ad.X = ad.X * 1000.5
    with pytest.raises(DataError, match="normalised but not log-transformed"):
        build_dataset(write_h5ad(ad, tmp_path / "cpm.h5ad"))


def test_empty_and_corrupt_files(tmp_path, pbmc_path):
    (tmp_path / "empty.h5ad").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.h5ad: the file is empty"):
        build_dataset(str(tmp_path / "empty.h5ad"))
    with pytest.raises(DataError, match=r"nocells\.h5ad: has no cells"):
        build_dataset(write_h5ad(counts_adata()[:0].copy(), tmp_path / "nocells.h5ad"))
    (tmp_path / "junk.h5ad").write_bytes(os.urandom(4096))
    with pytest.raises(DataError, match=r"junk\.h5ad: not a readable \.h5ad file"):
        build_dataset(str(tmp_path / "junk.h5ad"))
    good = write_h5ad(counts_adata(n_cells=3000), tmp_path / "full.h5ad")
    data = open(good, "rb").read()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.h5ad: .*(corrupt or truncated|not a readable)"):
        build_dataset(str(tmp_path / "cut.h5ad"))
    with pytest.raises(DataError, match="no such file"):
        build_dataset(str(tmp_path / "missing.h5ad"))


# ---------------------------------------------------------------------------------------------------- writing
def test_write_is_atomic_nothing_half_written(tmp_path):
    ad = counts_adata(n_cells=3000)
    x = ad.X.toarray()
    x[2500:] *= 0.5  # counts in the first cells, fractions later: fails mid-build
    ad.X = sparse.csr_matrix(x)
    path = write_h5ad(ad, tmp_path / "late.h5ad")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"late\.h5ad: X rows 2048:3000 contain non-integer values"):
        write_dataset(path, out, chunk_cells=2048, cells_per_shard=1000, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.h5ad"]  # no temp folder left behind


def test_write_refuses_existing_output_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    write_dataset(counts_adata(), out, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(counts_adata(), out, progress=False)
    info = write_dataset(counts_adata(n_cells=30), out, overwrite=True, progress=False)
    assert info["n_cells"] == 30 and read_build_info(out)["n_cells"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_writes_shards_report_and_tokenizer(tmp_path, pbmc_path):
    out = tmp_path / "pbmc"
    assert build_dataset_main([pbmc_path, "-o", str(out), "--split-by", "cell", "--cells-per-shard", "200"]) == 0
    info = read_build_info(out)
    assert info["splits"] == {"test": 70, "train": 630} and len(info["shards"]["train"]) == 4
    assert len(load_cell_tokenizer(out)) == 3 + 765
    test = load_dataset_dir(out, "test", cache_dir=str(tmp_path / "cache"))
    assert len(test) == 70 and set(test["split"]) == {"test"}
    again = tmp_path / "with-validation"
    assert build_dataset_main([pbmc_path, "-o", str(again), "--split-by", "cell", "--validation-size", "0.1"]) == 0
    assert read_build_info(again)["splits"] == {"test": 70, "train": 567, "validation": 63}
    assert load_dataset_dir(again, "test", cache_dir=str(tmp_path / "cache"))["cell_id"] == test["cell_id"]


def _cli_error(capsys, argv) -> str:
    """The one stderr line of a failed `scmmgpt build-dataset` (exit status 2, no traceback)."""
    try:
        status = build_dataset_main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("scmmgpt build-dataset: error: "), err
    return lines[0].removeprefix("scmmgpt build-dataset: error: ")


def test_cli_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    path = write_h5ad(counts_adata(), tmp_path / "cells.h5ad")
    out = str(tmp_path / "out")
    assert _cli_error(capsys, [str(tmp_path / "missing.h5ad"), "-o", out]).endswith("missing.h5ad: no such file")
    line = _cli_error(capsys, [path, "-o", out, "--label-column", "x"])
    assert line.startswith("--label-column 'x' is not a column of obs in") and "'cell_type'" in line
    assert _cli_error(capsys, [path, "-o", out, "--gene-column", "symbol"]).startswith(
        "--gene-column 'symbol' is not a column of .var in")
    assert _cli_error(capsys, [path, "-o", out, "--split-by", "cell", "--held-out-cell-types", "Martian cell"]) == (
        "--held-out-cell-types ['martian cell'] match no cell (by label, CL id or CL name)")
    assert _cli_error(capsys, [path, "-o", out, "--split-by", "cell", "--test-size", "2"]) == (
        "--test-size must be in (0, 1), got 2.0")
    assert _cli_error(capsys, [path, "-o", out, "--split-by", "donor"]).startswith("--split-by 'donor' cannot split")
    assert _cli_error(capsys, [path, "-o", out, "--validation-size", "1.5"]).startswith(
        "--validation-size must be a share of the training cells in [0, 1) or a whole number of cells, got 1.5")
    line = _cli_error(capsys, [path, "-o", out, "--vocab", str(tmp_path / "nowhere")])
    assert line.startswith("--vocab '") and line.endswith("is not a folder (a saved cell tokenizer)")
    label_map = str(tmp_path / "map.json")
    assert _cli_error(capsys, [path, "-o", out, "--label-map", label_map]).endswith("no such file")
    (tmp_path / "map.json").write_text("[1, 2]")
    assert "must hold one JSON object" in _cli_error(capsys, [path, "-o", out, "--label-map", label_map])
    assert _cli_error(capsys, [path, "-o", out, "--cells-per-shard", "0"]) == (
        "argument --cells-per-shard: must be a positive integer, got 0")
    martian = write_h5ad(counts_adata(labels=("B cell", "Martian cell")), tmp_path / "martian.h5ad")
    line = _cli_error(capsys, [martian, "-o", out])
    assert "'Martian cell' (30 cells)" in line and "--label-map FILE" in line and "--keep-unmapped" in line
    assert not os.path.exists(out)  # nothing written by any of them
    os.makedirs(out)
    (tmp_path / "out" / "kept.txt").write_text("")
    assert _cli_error(capsys, [path, "-o", out]).endswith("exists and is not empty; pass --overwrite to replace it")
    assert _cli_error(capsys, [path, "-o", path]).endswith("is a file, not a folder")


@pytest.mark.parametrize("value", ["1.5", "0", "-0.2", "1"])
def test_cli_test_size_out_of_range_is_an_error_with_or_without_split_by(tmp_path, capsys, value):
    path = write_h5ad(counts_adata(), tmp_path / "cells.h5ad")
    out = str(tmp_path / "out")
    for split_by in ([], ["--split-by", "cell"], ["--split-by", "auto"]):  # default: no split, all cells in train
        assert _cli_error(capsys, [path, "-o", out, "--test-size", value, *split_by]) == (
            f"--test-size must be in (0, 1), got {float(value)}")
    assert not os.path.exists(out)


def test_cli_valid_test_size_without_split_by_still_builds_train_only(tmp_path):
    path = write_h5ad(counts_adata(), tmp_path / "cells.h5ad")
    assert build_dataset_main([path, "-o", str(tmp_path / "out"), "--test-size", "0.3"]) == 0
    assert read_build_info(tmp_path / "out")["splits"] == {"train": 60}


def test_cli_gene_column_error_lists_the_table_the_genes_are_read_from(tmp_path, capsys, pbmc_path):
    out = str(tmp_path / "out")
    # scaled .X, log-normalised .raw: the genes are read from raw/X, whose .raw.var has no columns (.var has five)
    assert _cli_error(capsys, [pbmc_path, "-o", out, "--gene-column", "n_counts"]) == (
        f"--gene-column 'n_counts' is not a column of .raw.var in {pbmc_path}, the gene table of the matrix read "
        "(raw/X); columns of .raw.var: ['index']")
    # counts in .X, log values in .raw: the genes are read from X, so .var's columns, not .raw.var's
    ad = counts_adata()
    ad.var["gene_ids"] = [f"ENSG{i:05d}" for i in range(ad.n_vars)]
    ad.var["feature_types"] = "Gene Expression"
    raw = ad.copy()
    raw.X = raw.X.copy()
    raw.X.data = np.log1p(raw.X.data)
    raw.var = pd.DataFrame({"raw_only": list(raw.var_names)}, index=raw.var_names)
    ad.raw = raw
    path = write_h5ad(ad, tmp_path / "cells.h5ad")
    assert _cli_error(capsys, [path, "-o", out, "--gene-column", "raw_only"]) == (
        f"--gene-column 'raw_only' is not a column of .var in {path}, the gene table of the matrix read (X); "
        "columns of .var: ['index', 'gene_ids', 'feature_types']")
    with pytest.raises(DataError, match=r"'raw_only' is not a column of \.var in AnnData\[0\], .* \(X\); "
                                        r"columns of \.var: \['index', 'gene_ids', 'feature_types'\]$"):
        build_dataset(ad, gene_column="raw_only")  # the same from an in-memory AnnData
    # any column of that table can be named: Ensembl ids against an Ensembl vocabulary
    rows, tokenizer = build_dataset(path, list(ad.var["gene_ids"]), gene_column="gene_ids", return_tokenizer=True)
    assert len(rows) == 60 and len(tokenizer) == 3 + 40
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def pbmc_dir(tmp_path_factory, pbmc_path):
    out = tmp_path_factory.mktemp("built") / "pbmc"
    write_dataset(pbmc_path, out, cells_per_shard=100, progress=False)  # 7 shards
    return out


def test_stream_yields_the_same_cells_as_in_memory_for_a_seed(pbmc_dir, built):
    ds, _ = built
    by_id = {r["cell_id"]: r for r in ds}
    first = list(stream_dataset(pbmc_dir, seed=3, buffer_size=64))
    again = [r["cell_id"] for r in stream_dataset(pbmc_dir, seed=3, buffer_size=64)]
    other = [r["cell_id"] for r in stream_dataset(pbmc_dir, seed=4, buffer_size=64)]
    assert [r["cell_id"] for r in first] == again != other
    assert sorted(again) == sorted(by_id) and again != ds["cell_id"]  # all cells, once each, shuffled
    for row in first:
        kept = by_id[row["cell_id"]]
        assert np.array_equal(row["gene_ids"], kept["gene_ids"]) and row["gene_ids"].dtype == np.int32
        assert np.array_equal(row["expression"], kept["expression"]) and row["expression"].dtype == np.float32
        assert row["text"] == kept["text"]


@pytest.mark.parametrize("cells_per_shard", [100, 175])  # 7 shards: rows strided; 4 shards: whole shards per rank
def test_ranks_are_disjoint_and_cover_the_set(tmp_path, pbmc_path, cells_per_shard):
    out = tmp_path / "pbmc"
    write_dataset(pbmc_path, out, cells_per_shard=cells_per_shard, progress=False)
    ranks = [{r["cell_id"] for r in stream_dataset(out, seed=0, rank=k, world_size=2)} for k in range(2)]
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]
    assert len(ranks[0] | ranks[1]) == 700


# ---------------------------------------------------------------------------------------------------- splits
def test_split_by_donor_is_disjoint_and_reproducible():
    ad = counts_adata(n_cells=120, donor_id=[f"d{i % 6}" for i in range(120)])
    parts = build_dataset(ad, split_by="donor", test_size=0.3, seed=1)
    train, test = set(parts["train"]["donor_id"]), set(parts["test"]["donor_id"])
    assert test and not train & test and len(parts["train"]) + len(parts["test"]) == 120
    assert build_dataset(ad, split_by="donor", test_size=0.3, seed=1)["test"]["cell_id"] == parts["test"]["cell_id"]
    again = split_dataset(build_dataset(ad), by="donor", test_size=0.3, seed=1)
    assert again["test"]["cell_id"] == parts["test"]["cell_id"]


def test_split_by_cell_and_held_out_cell_types(built):
    ds, _ = built
    parts = split_dataset(ds, by="cell", test_size=0.2, seed=0, held_out_cell_types=["CL:0000623", "dendritic cell"])
    assert set(parts["heldout"]["cell_type"]) == {"CD56+ NK", "Dendritic"} and len(parts["heldout"]) == 31 + 240
    assert not {"CD56+ NK", "Dendritic"} & (set(parts["train"]["cell_type"]) | set(parts["test"]["cell_type"]))
    assert len(parts["test"]) == round(0.2 * (700 - 271))
    with pytest.raises(ValueError, match="split_by 'donor' cannot split these cells"):
        split_dataset(ds, by="donor")
    with pytest.raises(ValueError, match=r"held_out_cell_types \['martian cell'\] match no cell"):
        split_dataset(ds, by="cell", held_out_cell_types=["Martian cell"])



def test_validation_cells_are_training_cells_and_leave_the_test_split_as_it_was(built):
    ds, _ = built
    plain = split_dataset(ds, by="cell", test_size=0.2, seed=0, held_out_cell_types=["Dendritic"])
    share = split_dataset(ds, by="cell", test_size=0.2, seed=0, held_out_cell_types=["Dendritic"],
                          validation_size=0.1)
    assert share["test"]["cell_id"] == plain["test"]["cell_id"] and len(share["heldout"]) == 240
    assert len(share["validation"]) == round(0.1 * len(plain["train"]))
    assert set(share["validation"]["cell_id"]) | set(share["train"]["cell_id"]) == set(plain["train"]["cell_id"])
    assert not set(share["validation"]["cell_id"]) & set(share["train"]["cell_id"])
    # every type in its share of the training cells, to the cell, and each keeps training cells
    types, counts = np.unique(plain["train"]["cell_type"], return_counts=True)
    validation = dict(zip(*np.unique(share["validation"]["cell_type"], return_counts=True)))
    for cell_type, n in zip(types, counts):
        assert abs(validation.get(cell_type, 0) - 0.1 * n) < 1 and validation.get(cell_type, 0) < n, cell_type
    counted = split_dataset(ds, by=None, validation_size=50, seed=3)  # a number of cells; no test split
    assert len(counted["validation"]) == 50 and len(counted["train"]) == 650 and set(counted) == {"train", "validation"}
    assert split_dataset(ds, by=None, validation_size=50, seed=3)["validation"]["cell_id"] == (
        counted["validation"]["cell_id"])
    for bad, said in ((-0.1, "must be a share"), (2.5, "must be a share"), (700, "only 700 training cells")):
        with pytest.raises(ValueError, match=f"validation_size .*{said}"):
            split_dataset(ds, by=None, validation_size=bad)


# ---------------------------------------------------------------------------------------------------- scale
@pytest.mark.slow
def test_peak_memory_does_not_grow_with_cell_count(tmp_path):
    """Build and stream synthetic 50k- and 200k-cell × 20k-gene files; peak RSS must stay flat."""
    result = tmp_path / "scale.json"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_data_scale.py"),
                    "--work-dir", str(tmp_path), "--json", str(result)], check=True, timeout=3000)
    runs = {r["n_cells"]: r for r in json.loads(result.read_text())["runs"]}
    for step in ("build_peak_rss_mb", "stream_peak_rss_mb"):
        assert runs[200_000][step] < 1.25 * runs[50_000][step] + 50, (step, runs)
