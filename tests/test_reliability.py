"""Reliability: property-based tests of the cell tokenizer and processor on random and adversarial cells, and faults
survived by saving and loading (damaged weights, killed saves, pickled payloads)."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel, ScMMGPTCellTokenizer, ScMMGPTProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# gene names, unicode included (Greek, CJK, emoji, combining marks), distinct after case folding as the vocabulary's
# case-insensitive fallback requires
gene_names = st.lists(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8),
    min_size=1, max_size=12, unique_by=lambda g: g.upper(),
).filter(lambda genes: len({g.upper() for g in genes}) == len(genes) and not any(g.startswith("ENS") for g in genes))


@st.composite
def expression_matrices(draw, genes=None):
    """(cells × genes float64 counts, gene names): 0 to 8 cells, zeros, ties, tiny and huge values."""
    genes = draw(gene_names) if genes is None else genes
    n_cells = draw(st.integers(0, 8))
    value = st.one_of(
        st.just(0.0), st.just(0.0), st.integers(1, 5).map(float),  # zeros and tied small counts
        st.floats(1e-3, 1e3), st.sampled_from([1e-300, 1e12, 1e30]),  # underflow-prone and huge values
    )
    cells = draw(st.lists(st.lists(value, min_size=len(genes), max_size=len(genes)), min_size=n_cells, max_size=n_cells))
    return np.array(cells, dtype=np.float64).reshape(n_cells, len(genes)), genes


def _check_tokens(tok, out, expressed, max_genes):
    """The invariants every tokenised batch keeps; `expressed` (cells × genes, bool) marks values > 0."""
    gene_ids, values, mask = (np.asarray(out[k]) for k in ("gene_ids", "expression_values", "attention_mask"))
    n_cells = expressed.shape[0]
    nnz = expressed.sum(1)
    assert gene_ids.shape == values.shape == mask.shape and gene_ids.shape[0] == n_cells
    assert gene_ids.shape[1] == 1 + (int(np.minimum(nnz, max_genes).max()) if n_cells else 0)
    np.testing.assert_array_equal(mask.sum(1), 1 + np.minimum(nnz, max_genes))
    assert (gene_ids[:, 0] == tok.cls_token_id).all() and (values[:, 0] == 0).all()
    # real tokens first, then padding with the pad id and pad value
    assert (np.diff(mask, axis=1) <= 0).all()
    assert (gene_ids[mask == 0] == tok.pad_token_id).all() and (values[mask == 0] == tok.pad_value).all()
    assert np.isfinite(values).all()
    return gene_ids, values, mask


@FAST
@given(data=expression_matrices(), max_genes=st.integers(1, 6), mode=st.sampled_from(["continuous", "binned"]),
       normalize=st.booleans())
def test_tokenizer_invariants_on_random_cells(data, max_genes, mode, normalize):
    dense, genes = data
    if not normalize:
        dense = np.minimum(dense, 1e30)  # float32 holds up to 3.4e38; larger raw values are refused (tested below)
    tok = ScMMGPTCellTokenizer(gene_names=genes, max_genes=max_genes, input_value_mode=mode, normalize=normalize,
                               n_bins=7)
    out = tok(dense, genes)
    totals = dense.sum(1, keepdims=True)
    # what the tokenizer ranks; a count that normalisation underflows to 0 (1e-300 beside 1e30) is not expressed
    scaled = dense * np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0) if normalize else dense
    gene_ids, values, mask = _check_tokens(tok, out, scaled > 0, max_genes)
    # deterministic, and the same for CSR, CSC and dense input
    for other in (tok(dense, genes), tok(sparse.csr_matrix(dense), genes), tok(sparse.csc_matrix(dense), genes)):
        for key in out:
            np.testing.assert_array_equal(np.asarray(other[key]), np.asarray(out[key]))
    for c in range(dense.shape[0]):
        kept = gene_ids[c, 1 : mask[c].sum()] - 3  # column of each kept gene
        assert len(set(kept.tolist())) == len(kept) and (scaled[c, kept] > 0).all()
        # the kept genes are the top-k by value: no dropped gene has a higher value than a kept one
        dropped = np.setdiff1d(np.flatnonzero(scaled[c] > 0), kept)
        if dropped.size and kept.size:
            assert scaled[c, dropped].max() <= scaled[c, kept].min() * (1 + 1e-6)
        if mode == "binned":
            assert ((values[c, 1 : mask[c].sum()] >= 1) & (values[c, 1 : mask[c].sum()] <= 6)).all()


@FAST
@given(data=expression_matrices(), mode=st.sampled_from(["continuous", "binned"]))
def test_tokens_do_not_depend_on_column_order(data, mode):
    dense, genes = data
    tok = ScMMGPTCellTokenizer(gene_names=genes, max_genes=4, input_value_mode=mode)
    order = np.random.default_rng(len(genes)).permutation(len(genes))
    out, shuffled = tok(dense, genes), tok(dense[:, order], [genes[i] for i in order])
    for key in out:
        np.testing.assert_array_equal(np.asarray(shuffled[key]), np.asarray(out[key]))


@FAST
@given(genes=gene_names, n_cells=st.integers(0, 3), mode=st.sampled_from(["continuous", "binned"]))
def test_all_zero_and_zero_cells(genes, n_cells, mode):
    tok = ScMMGPTCellTokenizer(gene_names=genes, input_value_mode=mode)
    out = tok(sparse.csr_matrix((n_cells, len(genes))), genes, return_tensors="pt")
    assert out["gene_ids"].shape == (n_cells, 1) and out["attention_mask"].sum().item() == n_cells
    padded = tok(np.zeros((n_cells, len(genes))), genes, padding="max_length")
    assert padded["gene_ids"].shape == (n_cells, tok.max_genes + 1)


def test_one_gene_and_one_huge_count():
    tok = ScMMGPTCellTokenizer(gene_names=["ONLY"], max_genes=4)
    out = tok(np.array([[3.0], [0.0]]), ["ONLY"])
    assert out["gene_ids"].tolist() == [[1, 3], [1, 0]]
    np.testing.assert_allclose(out["expression_values"][0], [0.0, np.log1p(1e4)], rtol=1e-6)
    # one huge count dominates its cell after normalisation but stays finite and ranked first
    genes = ["A", "B", "C"]
    out = ScMMGPTCellTokenizer(gene_names=genes)(np.array([[1e30, 1.0, 2.0]]), genes)
    assert out["gene_ids"][0, 1] == 3 and np.isfinite(out["expression_values"]).all()
    with pytest.raises(ValueError, match="float32 range"):  # not normalised, it cannot be represented: say so
        ScMMGPTCellTokenizer(gene_names=genes, normalize=False)(np.array([[1e300, 1.0, 2.0]]), genes)


@pytest.mark.parametrize("genes", [["A", "B", "A"], ["TP53", "tp53"], ["ΑΒΓ", "αβγ"]])
def test_duplicated_genes_raise(genes):
    if len(set(genes)) < len(genes):
        with pytest.raises(ValueError, match="duplicated genes"):
            ScMMGPTCellTokenizer(gene_names=genes)
    # matrix columns that name one vocabulary gene twice (exactly or up to case) are refused
    tok = ScMMGPTCellTokenizer(gene_names=["A", "B", "TP53", "ΑΒΓ"])
    with pytest.raises(ValueError, match="same vocabulary entry"):
        tok(np.ones((2, len(genes))), genes)


def test_duplicate_sparse_entries_add_up():
    # a non-canonical CSR (the same cell × gene twice) means the sum, as scipy reads it
    matrix = sparse.csr_matrix((np.array([1.0, 2.0, 4.0]), np.array([0, 0, 1]), np.array([0, 3])), shape=(1, 2))
    assert not matrix.has_canonical_format
    tok = ScMMGPTCellTokenizer(gene_names=["A", "B"], normalize=False)
    assert tok(matrix, ["A", "B"])["expression_values"].tolist() == [[0.0, 4.0, 3.0]]
    assert not matrix.has_canonical_format  # the caller's matrix is left as it was


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=expression_matrices(genes=["CD3E", "MS4A1", "LYZ", "NKG7"]))
def test_processor_pairs_cells_with_prompts(minilm_tokenizer, data):
    dense, genes = data
    tok = ScMMGPTCellTokenizer(gene_names=genes, max_genes=3)
    processor = ScMMGPTProcessor(feature_extractor=tok, tokenizer=minilm_tokenizer, num_query_tokens=4)
    prompts = ["describe <cell> ✓ ünïcödé"] * dense.shape[0]
    if not prompts:
        out = processor(cells=dense, gene_names=genes, return_tensors="pt")
        assert out["gene_ids"].shape == (0, 1)
        return
    out = processor(cells=dense, text=prompts, gene_names=genes, return_tensors="pt")
    direct = tok(dense, genes, return_tensors="pt")
    torch.testing.assert_close(out["gene_ids"], direct["gene_ids"])
    torch.testing.assert_close(out["cell_attention_mask"], direct["attention_mask"])
    assert ((out["input_ids"] == processor.boc_token_id).sum(1) == 1).all()
    with pytest.raises(ValueError, match="placeholders"):
        processor(cells=dense, text=prompts + ["<cell>"], gene_names=genes)


# ------------------------------------------------------------------------------------------------ faults on disk
@pytest.fixture()
def saved_model(tmp_path):
    torch.manual_seed(0)
    model = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=50, num_hidden_layers=1)).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_weights_give_clear_error(saved_model, damage):
    _, folder = saved_model
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes({"garbage": os.urandom(len(raw)), "truncated": raw[: len(raw) // 2], "empty": b""}[damage])
    with pytest.raises(OSError, match="corrupted or truncated"):
        ScMMGPTCellModel.from_pretrained(folder)


def test_missing_weights_give_clear_error(saved_model):
    _, folder = saved_model
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        ScMMGPTCellModel.from_pretrained(folder)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_loading_never_unpickles(saved_model, tmp_path):
    _, folder = saved_model
    marker = tmp_path / "executed"
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"encoder.embedding.weight": _Payload(str(marker))}, f)
    with pytest.raises(OSError):
        ScMMGPTCellModel.from_pretrained(folder)
    with pytest.raises(Exception):  # asked for explicitly, the pickle goes through torch.load(weights_only=True)
        ScMMGPTCellModel.from_pretrained(folder, use_safetensors=False)
    assert not marker.exists()


def test_save_replaces_atomically_and_keeps_other_files(saved_model):
    model, folder = saved_model
    (folder / "tokenizer_note.txt").write_text("kept")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (folder / "checkpoint-5").mkdir()  # a Trainer checkpoint inside a stage folder keeps its own weights
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"checkpoint weights")
    with torch.no_grad():
        model.encoder.embedding.weight.add_(1.0)
    model.save_pretrained(folder)
    assert (folder / "tokenizer_note.txt").read_text() == "kept"
    assert not (folder / "model-00001-of-00002.safetensors").exists()
    assert (folder / "checkpoint-5" / "model.safetensors").read_bytes() == b"checkpoint weights"
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    reloaded = ScMMGPTCellModel.from_pretrained(folder)
    torch.testing.assert_close(reloaded.encoder.embedding.weight, model.encoder.embedding.weight)


def test_failed_save_leaves_previous_model_intact(saved_model, monkeypatch):
    model, folder = saved_model
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import transformers.modeling_utils

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder.parent / "new")
    assert not (folder.parent / "new").exists()
    assert [p.name for p in folder.parent.iterdir()] == ["model"]


def test_killed_save_never_leaves_a_loadable_folder(tmp_path):
    """A process killed while writing the weights leaves no target folder at all, only a hidden staging folder."""
    code = textwrap.dedent(f"""
        import os
        import transformers.modeling_utils as modeling_utils
        from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel
        real = modeling_utils.safe_save_file
        def killed_midway(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            os.kill(os.getpid(), 9)
        modeling_utils.safe_save_file = killed_midway
        ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=50, num_hidden_layers=1)).save_pretrained({str(tmp_path / "out")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert leftovers and all(p.name.startswith(".out.saving-") for p in leftovers)
