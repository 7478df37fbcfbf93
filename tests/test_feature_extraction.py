"""The cell tokenizer on the real PBMC file and on hand-computed examples."""

import warnings

import numpy as np
import pytest
import torch
from scipy import sparse
from transformers import AutoFeatureExtractor

from modeling_scmmgpt import ScMMGPTCellTokenizer


@pytest.fixture(scope="module")
def pbmc_tokenizer(pbmc):
    return ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=128, normalize=False)


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_pbmc_is_deterministic_and_input_type_independent(pbmc, pbmc_tokenizer):
    first = pbmc_tokenizer(pbmc, use_raw=True)
    again = pbmc_tokenizer(pbmc, use_raw=True)
    csr = pbmc_tokenizer(pbmc.raw.X, gene_names=list(pbmc.raw.var_names))
    dense = pbmc_tokenizer(pbmc.raw.X.toarray(), gene_names=list(pbmc.raw.var_names))
    for other in (again, csr, dense):
        _same(first, other)
    n_cells = pbmc.n_obs
    assert first["gene_ids"].shape == (n_cells, 129)
    assert (first["gene_ids"][:, 0] == pbmc_tokenizer.cls_token_id).all()
    nnz = np.diff(pbmc.raw.X.indptr)
    np.testing.assert_array_equal(first["attention_mask"].sum(1), 1 + np.minimum(nnz, 128))


def test_top_k_and_tie_breaking_by_gene_id():
    genes = ["A", "B", "C", "D", "E"]
    tok = ScMMGPTCellTokenizer(gene_names=genes, max_genes=3, normalize=False)
    cells = np.array([[1.0, 5.0, 0.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    out = tok(cells, genes)
    # cell 0: B and D tie at 5 → the lower gene id (B) first; then D, then E (2); A (1) is cut by max_genes=3
    assert out["gene_ids"].tolist() == [[1, 4, 6, 7], [1, 7, 0, 0]]
    assert out["expression_values"][0].tolist() == [0.0, 5.0, 5.0, 2.0]
    assert out["expression_values"][1, :2].tolist() == [0.0, 3.0]
    assert out["expression_values"][1, 2:].tolist() == [-2.0, -2.0]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert tok(cells, genes, padding="max_length")["gene_ids"].shape == (2, 4)


def test_binning_matches_hand_computed_quantiles():
    genes = [f"g{i}" for i in range(6)]
    tok = ScMMGPTCellTokenizer(gene_names=genes, normalize=False, input_value_mode="binned", n_bins=5)
    # non-zero values 1, 2, 3, 4, 5 → edges = quantiles at 0, 1/3, 2/3, 1 = [1, 2.333, 3.667, 5]
    # digitize: 1→1, 2→1, 3→2, 4→3, 5→4 (bins 1..n_bins-1; 0 is "not expressed")
    cells = np.array([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0]])
    out = tok(cells, genes)
    by_gene = dict(zip(out["gene_ids"][0, 1:].tolist(), out["expression_values"][0, 1:].tolist()))
    assert by_gene == {4: 4.0, 6: 3.0, 8: 2.0, 7: 1.0, 5: 1.0}
    assert np.digitize([1, 2, 3, 4, 5], np.quantile([1, 2, 3, 4, 5], np.linspace(0, 1, 4))).tolist() == [1, 1, 2, 3, 4]


def test_binning_matches_numpy_reference_on_random_cells():
    rng = np.random.default_rng(0)
    matrix = sparse.random(60, 300, density=0.3, random_state=1, format="csr")
    matrix.data = np.round(matrix.data * 20) + 1  # many ties, as in counts
    genes = [f"g{i}" for i in range(300)]
    tok = ScMMGPTCellTokenizer(gene_names=genes, normalize=False, input_value_mode="binned", n_bins=11)
    out = tok(matrix, genes)
    for c in rng.choice(60, 10, replace=False):
        row = matrix[c].toarray().ravel()
        nonzero = np.flatnonzero(row)
        expected = np.digitize(row[nonzero], np.quantile(row[nonzero], np.linspace(0, 1, 10)))
        kept = out["attention_mask"][c].astype(bool)
        got = dict(zip(out["gene_ids"][c, kept][1:] - 3, out["expression_values"][c, kept][1:]))
        assert got == dict(zip(nonzero, expected.astype(float)))


def test_normalize_total_log1p():
    tok = ScMMGPTCellTokenizer(gene_names=["A", "B"], normalize=True, target_sum=100)
    out = tok(np.array([[1.0, 3.0]]), ["A", "B"])
    np.testing.assert_allclose(out["expression_values"][0, 1:], np.log1p([75.0, 25.0]), rtol=1e-6)


def test_ensembl_ids_and_case_map_to_symbols():
    tok = ScMMGPTCellTokenizer(gene_names=["CD3E", "MS4A1"], ensembl_ids=["ENSG00000198851", "ENSG00000156738"])
    ids = tok.convert_genes_to_ids(["ENSG00000156738.17", "cd3e", "NOPE"])
    assert ids.tolist() == [4, 3, -1]


def test_empty_cells_give_cls_only_and_pt_tensors():
    tok = ScMMGPTCellTokenizer(gene_names=["A", "B"], normalize=True)
    out = tok(sparse.csr_matrix((3, 2)), ["A", "B"], return_tensors="pt")
    assert isinstance(out["gene_ids"], torch.Tensor) and out["gene_ids"].shape == (3, 1)
    assert out["attention_mask"].tolist() == [[1], [1], [1]]


@pytest.mark.parametrize(
    "cells, genes, message",
    [
        (np.zeros((2, 2, 2)), ["A", "B"], "2-D"),
        (np.zeros((2, 3)), ["A", "B"], "3 genes"),
        (np.ones((2, 2)), ["X", "Y"], "none of the 2 genes"),
        (np.array([[np.nan, 1.0]]), ["A", "B"], "NaN"),
        (np.array([[np.inf, 1.0]]), ["A", "B"], "infinite"),
        (np.array([[-1.0, 1.0]]), ["A", "B"], "negative"),
        (np.ones((1, 2)), ["A", "a"], "same vocabulary entry"),
        (np.ones((1, 2)), None, "gene_names is required"),
    ],
)
def test_bad_input_raises_clear_error(cells, genes, message):
    tok = ScMMGPTCellTokenizer(gene_names=["A", "B"])
    with pytest.raises(ValueError, match=message):
        tok(cells, genes)


def test_unknown_genes_warn_with_count():
    tok = ScMMGPTCellTokenizer(gene_names=["A", "B"], normalize=False)
    with pytest.warns(UserWarning, match="2 of 3 genes are not in the vocabulary"):
        out = tok(np.array([[1.0, 2.0, 3.0]]), ["A", "X", "Y"])
    assert out["gene_ids"].tolist() == [[1, 3]]


def test_save_and_load_keep_vocabulary_and_options(tmp_path, pbmc, pbmc_tokenizer):
    pbmc_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "gene_vocab.json").exists()
    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert isinstance(loaded, ScMMGPTCellTokenizer)
    assert loaded.gene_names == pbmc_tokenizer.gene_names and len(loaded) == len(pbmc_tokenizer)
    assert (loaded.max_genes, loaded.normalize) == (128, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the PBMC genes are all known
        _same(loaded(pbmc, use_raw=True), pbmc_tokenizer(pbmc, use_raw=True))


def test_column_mapping_is_reused_only_for_the_same_genes():
    """Batch after batch of one matrix maps its columns once; another gene list (or order) is mapped anew, and unknown
    genes are still reported on every call."""
    tokenizer = ScMMGPTCellTokenizer(gene_names=["A", "B", "C", "D"], normalize=False)
    cells = sparse.csr_matrix(np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 5.0]], dtype=np.float32))
    first = tokenizer(cells, gene_names=["A", "B", "C"])
    again = tokenizer(cells, gene_names=["A", "B", "C"])
    reordered = tokenizer(cells, gene_names=["C", "B", "A"])
    _same(first, again)
    assert first["gene_ids"][0, 1:].tolist() == [5, 4, 3]  # C, B, A by expression (ids after 3 special tokens)
    assert reordered["gene_ids"][0, 1:].tolist() == [3, 4, 5]
    for _ in range(2):
        with pytest.warns(UserWarning, match="1 of 3 genes are not in the vocabulary"):
            tokenizer(cells, gene_names=["A", "B", "NOVEL"])
    assert "_columns" not in tokenizer.to_dict()


# ---------------------------------------------------------------------------------------------------- chunked, threaded
@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few values and blocks of a few cells, so that small matrices cross many chunk / block edges."""
    from modeling_scmmgpt import feature_extraction_scmmgpt as module

    monkeypatch.setattr(module, "CHUNK_VALUES", 97)
    monkeypatch.setattr(module, "BLOCK_VALUES", 64)
    monkeypatch.setattr(module, "MAX_CHUNK_ROWS", 5)


def _counts_with_edge_cases(n_cells=120, n_genes=300, seed=0) -> sparse.csr_matrix:
    """Seeded counts with many ties, an empty cell, a cell with one gene, a cell with every gene and explicit zeros."""
    from benchmarks.bench_tokenizer import synthetic_counts

    matrix = synthetic_counts(n_cells, n_genes=n_genes, p=0.15, seed=seed).tolil()
    matrix[3, :] = 0
    matrix[4, :] = 0
    matrix[4, 7] = 5
    matrix[5, :] = np.arange(1, n_genes + 1) % 4 + 1
    matrix = matrix.tocsr()
    matrix.data[::50] = 0  # stored zeros: not expressed
    return matrix


@pytest.mark.parametrize("mode", ["continuous", "binned"])
@pytest.mark.parametrize("max_genes", [8, 64, 400])
def test_matches_the_per_cell_reference_of_scgpts_algorithm(mode, max_genes, small_chunks):
    """Bit for bit the plain per-cell loop (dense row, normalise + log1p, np.quantile + np.digitize, stable top-k),
    across chunk and block edges, with empty cells, cells shorter than max_genes and tied values."""
    from benchmarks.bench_tokenizer import reference_tokenize

    matrix = _counts_with_edge_cases()
    genes = [f"g{i}" for i in range(matrix.shape[1])]
    tok = ScMMGPTCellTokenizer(gene_names=genes, max_genes=max_genes, input_value_mode=mode, n_bins=11, num_workers=1)
    out = tok(matrix, genes)
    reference = reference_tokenize(matrix, tok.convert_genes_to_ids(genes), max_genes, binned=mode == "binned",
                                   n_bins=11, pad_value=tok.pad_value)
    _same(out, reference)
    assert out["attention_mask"][3].sum() == 1 and out["attention_mask"][4].sum() == 2  # <cls> only; <cls> + 1 gene
    expressed = int((matrix[5].data > 0).sum())  # every gene, less the stored zeros
    assert matrix.shape[1] - 10 < expressed < matrix.shape[1]
    assert out["attention_mask"][5].sum() == 1 + min(max_genes, expressed)


def test_matches_the_reference_on_pbmc_counts():
    """The real PBMC cells (as integer counts, so that both sides total them exactly), both value modes."""
    import scanpy as sc

    from benchmarks.bench_tokenizer import reference_tokenize

    adata = sc.datasets.pbmc68k_reduced()
    counts = sparse.csr_matrix(np.round(np.expm1(adata.raw.X.toarray()) * 3).astype(np.float32))
    genes = list(adata.raw.var_names)
    for mode in ("continuous", "binned"):
        tok = ScMMGPTCellTokenizer(gene_names=genes, max_genes=100, input_value_mode=mode)
        reference = reference_tokenize(counts, tok.convert_genes_to_ids(genes), 100, binned=mode == "binned")
        _same(tok(counts, genes, num_workers=1), reference)
        _same(tok(counts, genes, num_workers=2), reference)


@pytest.mark.parametrize("mode", ["continuous", "binned"])
@pytest.mark.parametrize("normalize", [True, False])
def test_number_of_workers_never_changes_the_output(mode, normalize, small_chunks):
    matrix = _counts_with_edge_cases(seed=1)
    genes = [f"g{i}" for i in range(matrix.shape[1])]
    vocabulary = genes[::-1][:250] + ["extra"]  # gene ids in another order than the columns; 50 columns unknown
    tok = ScMMGPTCellTokenizer(gene_names=vocabulary, max_genes=50, normalize=normalize, input_value_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serial = tok(matrix, genes, num_workers=1)
        assert serial["attention_mask"].sum() > matrix.shape[0]
        for workers in (2, 3):
            _same(tok(matrix, genes, num_workers=workers), serial)
        _same(ScMMGPTCellTokenizer(gene_names=vocabulary, max_genes=50, normalize=normalize, input_value_mode=mode,
                                   num_workers=2)(matrix, genes), serial)


def test_int32_ids_and_mask_carry_the_same_tokens_and_the_encoder_takes_them(pbmc):
    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel

    tok = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=64, normalize=False)
    wide = tok(pbmc[:32], use_raw=True, return_tensors="pt")
    narrow = tok(pbmc[:32], use_raw=True, return_tensors="pt", ids_dtype="int32")
    assert narrow["gene_ids"].dtype == narrow["attention_mask"].dtype == torch.int32
    assert wide["gene_ids"].dtype == wide["attention_mask"].dtype == torch.int64
    assert narrow["expression_values"].dtype == torch.float32
    for key in wide:
        assert torch.equal(narrow[key].long() if key != "expression_values" else narrow[key], wide[key])
    assert ScMMGPTCellTokenizer(gene_names=["A"], ids_dtype="int32")(np.ones((2, 1)), ["A"])["gene_ids"].dtype == np.int32
    torch.manual_seed(0)
    encoder = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=len(tok))).eval()
    with torch.inference_mode():
        states = [encoder(t["gene_ids"], t["expression_values"], t["attention_mask"]).last_hidden_state
                  for t in (wide, narrow)]
    assert torch.equal(*states)


def test_cells_with_only_unknown_or_unexpressed_genes_give_cls_only():
    tok = ScMMGPTCellTokenizer(gene_names=["A", "B"], normalize=True, input_value_mode="binned", n_bins=5)
    cells = sparse.csr_matrix(np.array([[0.0, 0.0, 7.0], [2.0, 1.0, 3.0], [0.0, 0.0, 0.0]]))
    with pytest.warns(UserWarning, match="1 of 3 genes"):
        out = tok(cells, ["A", "B", "NOVEL"])
    assert out["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert out["gene_ids"].tolist() == [[1, 0, 0], [1, 3, 4], [1, 0, 0]]
    assert out["expression_values"].tolist() == [[0, -2, -2], [0, 4, 1], [0, -2, -2]]  # A above B: bins 4, 1


def test_non_negative_pad_value_fills_padding():
    tok = ScMMGPTCellTokenizer(gene_names=["A", "B", "C"], normalize=False, pad_value=0.5)
    out = tok(np.array([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), ["A", "B", "C"])
    assert out["gene_ids"].tolist() == [[1, 3, 5], [1, 4, 0]]
    assert out["expression_values"].tolist() == [[0.0, 3.0, 1.0], [0.0, 2.0, 0.5]]


@pytest.mark.parametrize("option, value", [("num_workers", 0), ("num_workers", 1.5), ("ids_dtype", "float32"),
                                           ("ids_dtype", "int16")])
def test_bad_worker_count_or_ids_dtype_is_refused(option, value):
    tok = ScMMGPTCellTokenizer(gene_names=["A"])
    with pytest.raises(ValueError, match=option):
        tok(np.ones((1, 1)), ["A"], **{option: value})
    with pytest.raises(ValueError, match=option):
        ScMMGPTCellTokenizer(gene_names=["A"], **{option: value})
