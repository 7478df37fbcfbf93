"""Every input a user brings, through the Python API (`ScMMGPTJobs`): one set of cells written the ways people have
them — dense, CSR and CSC `.X`, a backed file, scaled `.X` with log-normalised `.raw`, a counts layer, log-normalised
`.X`, normalised-not-logged `.X`, a bare matrix — gives the same labels; bad inputs and empty cells get clear answers."""

import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from modeling_scmmgpt import ScMMGPTJobs
from modeling_scmmgpt.inputs_scmmgpt import read_cells, value_kind
from modeling_scmmgpt.jobs_scmmgpt import _tidy_description, ontology_name

from .conftest import TINY_LABEL_TEXTS

N_CELLS = 40


@pytest.fixture(scope="module")
def jobs(tiny_model_dir):
    return ScMMGPTJobs.from_pretrained(tiny_model_dir, progress=False, verbose=False)


@pytest.fixture(scope="module")
def data(pbmc):
    """The same cells as counts, log1p(CP10k) (what scanpy's normalize_total + log1p write) and scaled values."""
    counts = np.round(np.expm1(pbmc.raw.X[:N_CELLS].toarray()) * 3).astype(np.float32)
    per_10k = counts.astype(np.float64) * (1e4 / counts.sum(1, keepdims=True))
    lognorm = np.log1p(per_10k).astype(np.float32)
    scaled = ((lognorm - lognorm.mean(0)) / (lognorm.std(0) + 1e-3)).astype(np.float32)
    var = pd.DataFrame(index=list(pbmc.raw.var_names))
    obs = pd.DataFrame(index=list(pbmc.obs_names[:N_CELLS]))
    return {"counts": counts, "per_10k": per_10k.astype(np.float32), "lognorm": lognorm, "scaled": scaled,
            "var": var, "obs": obs}


def forms(data, tmp_path):
    """name → (cells, input options): the documented accepted forms of the same cells."""
    counts, var, obs = data["counts"], data["var"], data["obs"]
    backed = tmp_path / "counts.h5ad"
    anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var).write_h5ad(backed)
    scaled_with_raw = anndata.AnnData(X=data["lognorm"], obs=obs, var=var)
    scaled_with_raw.raw = scaled_with_raw
    scaled_with_raw.X = data["scaled"]
    layered = anndata.AnnData(X=data["scaled"], obs=obs, var=var, layers={"counts": sparse.csr_matrix(counts)})
    return {
        "dense counts": (anndata.AnnData(X=counts, obs=obs, var=var), {}),
        "CSR counts": (anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var), {}),
        "CSC counts": (anndata.AnnData(X=sparse.csc_matrix(counts), obs=obs, var=var), {}),
        "backed file": (str(backed), {}),
        "backed AnnData": (anndata.read_h5ad(backed, backed="r"), {}),
        "scaled X, log-normalised raw": (scaled_with_raw, {}),
        "scaled X, counts layer": (layered, {"layer": "counts"}),
        "log-normalised X": (anndata.AnnData(X=data["lognorm"], obs=obs, var=var), {}),
        "normalised, not logged X": (anndata.AnnData(X=data["per_10k"], obs=obs, var=var), {}),
        "CSR matrix": (sparse.csr_matrix(counts), {"gene_names": list(var.index)}),
    }


def test_every_accepted_form_gives_the_same_labels(jobs, data, tmp_path):
    results = {name: jobs.annotate(cells, **options) for name, (cells, options) in forms(data, tmp_path).items()}
    reference = results["dense counts"]
    assert None not in reference.predictions  # equal scores below: equal labels whatever a tiny model prefers
    for name, result in results.items():
        assert result.predictions == reference.predictions, name
        np.testing.assert_allclose(result.scores, reference.scores, atol=1e-4, err_msg=name)
    embeddings = {name: jobs.embed(cells, **options) for name, (cells, options) in forms(data, tmp_path).items()
                  if name in ("dense counts", "backed file", "scaled X, log-normalised raw")}
    for name, vectors in embeddings.items():
        np.testing.assert_allclose(vectors, embeddings["dense counts"], atol=1e-4, err_msg=name)


def test_the_decision_is_detected_and_said(jobs, data, tmp_path, capsys):
    cases = {"dense counts": (".X", "counts", True), "scaled X, log-normalised raw": (".raw", "log1p", False),
             "scaled X, counts layer": ("layers['counts']", "counts", True), "log-normalised X": (".X", "log1p", False),
             "normalised, not logged X": (".X", "normalized", True)}
    all_forms = forms(data, tmp_path)
    for name, (source, kind, normalize) in cases.items():
        cells, options = all_forms[name]
        inputs = read_cells(cells, jobs.cell_tokenizer, **options)
        assert (inputs.source, inputs.value_kind, inputs.normalize) == (source, kind, normalize), name
    loud = ScMMGPTJobs(jobs.model, jobs.processor, jobs.label_texts, progress=False)
    loud.embed(all_forms["scaled X, log-normalised raw"][0])
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "from .raw (.X holds scaled values)" in said and "used as they are" in said
    for matrix in (data["counts"], sparse.csr_matrix(data["counts"]), sparse.csc_matrix(data["counts"])):
        assert value_kind(matrix) == "counts"


def test_inputs_that_cannot_be_read_get_clear_errors(jobs, data):
    obs, var = data["obs"], data["var"]
    scaled_only = anndata.AnnData(X=data["scaled"], obs=obs, var=var, layers={"counts": data["counts"]})
    with pytest.raises(ValueError, match=r"scaled .*--layer NAME.*\['counts'\]"):
        jobs.annotate(scaled_only)
    with pytest.raises(ValueError, match="scaled"):
        jobs.annotate(scaled_only, normalize=True)  # forcing normalisation does not make scaled values counts
    with pytest.raises(ValueError, match="layer 'spliced' is not in the AnnData"):
        jobs.annotate(scaled_only, layer="spliced")
    with pytest.raises(ValueError, match="no .raw"):
        jobs.annotate(scaled_only, use_raw=True)
    nan = data["counts"].copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        jobs.embed(anndata.AnnData(X=nan, obs=obs, var=var))
    with pytest.raises(ValueError, match="no cells"):
        jobs.embed(anndata.AnnData(X=data["counts"][:0], var=var))
    with pytest.raises(ValueError, match="layer / use_raw apply to AnnData"):
        jobs.embed(data["counts"], gene_names=list(var.index), use_raw=True)


def test_api_arguments_are_checked(jobs, data):
    cells = anndata.AnnData(X=data["counts"][:4], var=data["var"])
    checks = [
        (lambda: jobs.annotate(cells, "CD19+ B"), "labels must be a list of names"),
        (lambda: jobs.annotate(cells, []), "non-empty list"),
        (lambda: jobs.annotate(cells, ["B", "B"]), "duplicates"),
        (lambda: jobs.annotate(cells, ["B", "T"], label_texts=["cell type: B cell."]), "one text per label"),
        (lambda: jobs.annotate(cells, method="vote"), "method 'vote' is not one of"),
        (lambda: jobs.embed(cells, batch_size=0), "batch_size must be a positive integer"),
        (lambda: jobs.embed(cells, space="text"), "space must be"),
        (lambda: jobs.describe(cells, prompt="Describe it:"), "exactly one <cell>"),
        (lambda: jobs.describe(cells, max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (lambda: jobs.generate_cells(""), "non-empty string"),
        (lambda: jobs.generate_cells([]), "non-empty list"),
        (lambda: jobs.generate_cells("cell type: B cell.", n_per_text=0), "n_per_text must be a positive integer"),
        (lambda: jobs.generate_cells("cell type: B cell.", genes="LYZ"), "genes must be a list of names"),
        (lambda: jobs.generate_cells("cell type: B cell.", noise_scale=-1), "noise_scale"),
    ]
    for call, message in checks:
        with pytest.raises(ValueError, match=message):
            call()


def test_cells_with_no_known_gene_get_no_answer(jobs, data):
    counts = data["counts"][:6].copy()
    counts[[1, 4]] = 0
    cells = anndata.AnnData(X=counts, var=data["var"])
    with pytest.warns(UserWarning, match="2 of 6 cells have no expressed gene"):
        result = jobs.annotate(cells)
    assert [p is None for p in result.predictions] == [False, True, False, False, True, False]
    assert np.isnan(result.scores[[1, 4]]).all() and np.isfinite(result.scores[[0, 2, 3, 5]]).all()
    with pytest.warns(UserWarning, match="2 of 6 cells"):
        vectors = jobs.embed(cells)
    assert np.isnan(vectors[[1, 4]]).all() and np.isfinite(vectors[[0, 2, 3, 5]]).all()
    with pytest.warns(UserWarning, match="2 of 6 cells"):
        texts = jobs.describe(cells, max_new_tokens=3)
    assert texts[1] == texts[4] == "" and len(texts) == 6


def test_unknown_genes_are_said_once_per_job(jobs, data, capsys):
    extra = np.hstack([data["counts"], np.ones((N_CELLS, 3), np.float32)])
    genes = list(data["var"].index) + ["NOVEL1", "NOVEL2", "NOVEL3"]
    loud = ScMMGPTJobs(jobs.model, jobs.processor, jobs.label_texts, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tokenizer's per-batch warning must not escape
        loud.embed(extra, gene_names=genes, batch_size=4)
    said = capsys.readouterr().err
    assert said.count("not in the model's vocabulary") == 1 and "3 of" in said


def test_default_labels_and_likelihood_use_the_learned_ontology_names(jobs, data):
    cells = anndata.AnnData(X=data["counts"][:8], var=data["var"])
    default = jobs.annotate(cells, method="likelihood")
    assert default.labels == list(TINY_LABEL_TEXTS)
    names = [ontology_name(text) for text in TINY_LABEL_TEXTS.values()]
    assert names == ["dendritic cell", "CD14-positive monocyte", "B cell"]
    by_name = jobs.annotate(cells, labels=names, method="likelihood")
    np.testing.assert_allclose(default.scores, by_name.scores, atol=1e-6)
    # retrieval with the dataset's own labels reads the model's texts for them
    chosen = jobs.annotate(cells, labels=["CD19+ B", "Dendritic"])
    texts = jobs.annotate(cells, labels=["CD19+ B", "Dendritic"],
                          label_texts=[TINY_LABEL_TEXTS["CD19+ B"], TINY_LABEL_TEXTS["Dendritic"]])
    np.testing.assert_allclose(chosen.scores, texts.scores, atol=1e-6)


def test_descriptions_are_long_enough_and_tidy(jobs):
    longest = max(len(jobs.processor.tokenizer(t, add_special_tokens=False)["input_ids"])
                  for t in TINY_LABEL_TEXTS.values())
    assert jobs.default_description_tokens() >= longest
    assert _tidy_description("cell type:cell type: cell type: B cell. A lymph", cut=True) == "cell type: B cell."
    assert _tidy_description("cell type: B cell. A lymphocyte.", cut=False) == "cell type: B cell. A lymphocyte."
    assert _tidy_description("cell type: CD14-positive mono", cut=True) == "cell type: CD14-positive"


def test_long_prompts_are_truncated_with_a_warning(jobs):
    long_prompt = "cell type: B cell. " + "A lymphocyte of B lineage. " * 200
    with pytest.warns(UserWarning, match="truncated"):
        cells = jobs.generate_cells(long_prompt, genes=["LYZ", "MS4A1"])
    assert cells.expression.shape == (1, 2) and np.isfinite(cells.expression).all()


def test_log1p_of_another_total_is_brought_to_the_models_10k(data, jobs):
    """log1p(CPM) is detected as log1p values normalised to a larger total: the cells come out as log1p(CP10k)."""
    per_million = np.log1p(data["per_10k"].astype(np.float64) * 100).astype(np.float32)
    genes = list(data["var"].index)
    cpm = read_cells(per_million, jobs.cell_tokenizer, genes)
    cp10k = read_cells(data["lognorm"], jobs.cell_tokenizer, genes)
    assert cpm.unlog and cpm.normalize and not cp10k.unlog and not cp10k.normalize
    assert "larger total than 10k" in cpm.decision and cpm.record()["unlogged"]
    encoded = [jobs.cell_tokenizer(chunk, gene_names=c.gene_names, normalize=c.normalize, return_tensors="np")
               for c in (cpm, cp10k) for _, chunk in c.chunks(N_CELLS)]
    np.testing.assert_array_equal(encoded[0]["gene_ids"], encoded[1]["gene_ids"])
    np.testing.assert_allclose(encoded[0]["expression_values"], encoded[1]["expression_values"], atol=1e-4)
    # asked not to normalise, the values stay as given
    assert not read_cells(per_million, jobs.cell_tokenizer, genes, normalize="no").unlog


def test_job_warnings_point_at_the_callers_line(jobs, data):
    """The jobs run under torch.inference_mode, whose wrapper is one frame between a job and its caller: the empty
    cells' and long prompts' warnings name the caller's file, not torch's `_contextlib.py`."""
    counts = data["counts"][:3].copy()
    counts[1] = 0
    with pytest.warns(UserWarning, match="1 of 3 cells have no expressed gene") as record:
        jobs.embed(anndata.AnnData(X=counts, var=data["var"]))
    assert {w.filename for w in record if "no expressed gene" in str(w.message)} == {__file__}
    with pytest.warns(UserWarning, match="truncated") as record:
        jobs.generate_cells("cell type: B cell. " + "A lymphocyte of B lineage. " * 200, genes=["LYZ"])
    assert {w.filename for w in record if "truncated" in str(w.message)} == {__file__}
