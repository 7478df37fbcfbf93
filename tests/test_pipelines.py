"""The `cell-annotation`, `cell-description` and `text-to-cell` pipelines: inputs, batch size, JSON outputs, errors,
saving into a model folder, and loading by `pipeline(task, model=folder, trust_remote_code=True)` in a fresh process."""

import copy
import json
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch
from scipy import sparse
from transformers import pipeline

from modeling_scmmgpt import (
    ScMMGPTCellConfig,
    ScMMGPTCellModel,
    ScMMGPTCellTokenizer,
    ScMMGPTConfig,
    ScMMGPTForConditionalGeneration,
    ScMMGPTJobs,
    ScMMGPTModel,
    ScMMGPTProcessor,
)
from modeling_scmmgpt.pipeline_scmmgpt import (
    CellAnnotationPipeline,
    CellDescriptionPipeline,
    TextToCellPipeline,
    save_pipelines,
)
from modeling_scmmgpt.inputs_scmmgpt import read_cells
from modeling_scmmgpt.ontology_scmmgpt import ONTOLOGY_FILE, shipped_ontology_file

from .conftest import run_fresh_python

LABELS = ["CD14-positive monocyte", "B cell", "natural killer cell", "dendritic cell"]  # Cell Ontology names
TEXTS = ["cell type: CD14-positive monocyte.", "cell type: B cell."]


# ---------------------------------------------------------------------------------------------------- helpers
def make_processor(pbmc, minilm_tokenizer, max_genes: int = 64) -> ScMMGPTProcessor:
    """The tiny-model processor of tests/test_multimodal.py: PBMC genes, the shipped all-MiniLM tokenizer, 4 queries."""
    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=max_genes, normalize=False)
    return ScMMGPTProcessor(cell_tokenizer, copy.deepcopy(minilm_tokenizer), num_query_tokens=4)


def tiny_config(processor, **overrides) -> ScMMGPTConfig:
    text_vocab = len(processor.tokenizer)
    qformer = dict(model_type="bert", vocab_size=text_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ScMMGPTConfig.tiny(cell_config=ScMMGPTCellConfig.tiny(vocab_size=len(processor.feature_extractor)),
                              qformer_config=qformer, text_vocab_size=text_vocab, **overrides)


def make_stage2(processor, seed: int = 0, **overrides) -> ScMMGPTForConditionalGeneration:
    torch.manual_seed(seed)
    model = ScMMGPTForConditionalGeneration(tiny_config(processor, **overrides))
    model.set_cell_token_ids(processor)
    return model.eval()


def save_model_folder(model, processor, folder) -> str:
    """A push-ready tiny folder: weights, code, processor, pipelines."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipelines(folder)
    return str(folder)


def gene_dicts(adata) -> list[dict]:
    """Each cell of `adata.raw` as a dict of gene → value (its non-zero entries)."""
    matrix, genes = sparse.csr_matrix(adata.raw.X), list(adata.raw.var_names)
    return [{genes[j]: float(v) for j, v in zip(matrix.indices[matrix.indptr[i]:matrix.indptr[i + 1]],
                                                   matrix.data[matrix.indptr[i]:matrix.indptr[i + 1]])}
            for i in range(matrix.shape[0])]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def processor(pbmc, minilm_tokenizer):
    return make_processor(pbmc, minilm_tokenizer)


@pytest.fixture(scope="module")
def model(processor):
    return make_stage2(processor)


@pytest.fixture(scope="module")
def jobs(model, processor):
    return ScMMGPTJobs(model, processor, verbose=False)


@pytest.fixture(scope="module")
def model_dir(model, processor, tmp_path_factory):
    return save_model_folder(model, processor, tmp_path_factory.mktemp("pipelines") / "tiny_scmmgpt")


@pytest.fixture(scope="module")
def annotator(model, processor):
    return pipeline("cell-annotation", model=model, processor=processor)


# ---------------------------------------------------------------------------------------------------- saving
def test_saved_folders_declare_their_pipelines(model_dir, processor, tmp_path):
    config = json.loads(open(f"{model_dir}/config.json").read())
    assert set(config["custom_pipelines"]) == {"cell-annotation", "cell-description", "text-to-cell"}
    assert config["custom_pipelines"]["text-to-cell"] == {
        "impl": "pipeline_scmmgpt.TextToCellPipeline", "pt": ["AutoModelForCausalLM"], "type": "multimodal"}
    # stage 1 annotates by retrieval only, and loads with AutoModel; a bare cell encoder has no pipelines
    stage1 = ScMMGPTModel(tiny_config(processor))
    stage1.save_pretrained(tmp_path / "stage1")
    assert save_pipelines(tmp_path / "stage1") == {"cell-annotation": {
        "impl": "pipeline_scmmgpt.CellAnnotationPipeline", "pt": ["AutoModel"], "type": "multimodal"}}
    encoder = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=len(processor.feature_extractor)))
    encoder.save_pretrained(tmp_path / "encoder")
    assert save_pipelines(tmp_path / "encoder") == {}
    assert not (tmp_path / "encoder" / "pipeline_scmmgpt.py").exists()
    # the Cell Ontology annotate labels resolve in travels with the code (remote code reads it from the folder)
    assert (Path(model_dir) / ONTOLOGY_FILE).read_bytes() == shipped_ontology_file().read_bytes()
    assert (tmp_path / "stage1" / ONTOLOGY_FILE).is_file() and not (tmp_path / "encoder" / ONTOLOGY_FILE).exists()


def test_pipeline_save_pretrained_keeps_every_task(annotator, tmp_path):
    annotator.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"cell-annotation", "cell-description", "text-to-cell"}
    assert (tmp_path / "saved" / "processor_config.json").is_file()
    assert (tmp_path / "saved" / "pipeline_scmmgpt.py").is_file() and (tmp_path / "saved" / ONTOLOGY_FILE).is_file()


# ---------------------------------------------------------------------------------------------------- in process
def test_cell_inputs_agree_and_batch_size_leaves_results_unchanged(annotator, jobs, pbmc, pbmc_path):
    cells = pbmc[:12]
    expected = jobs.annotate(cells, LABELS, use_raw=True).scores
    by_anndata = annotator(cells, labels=LABELS, use_raw=True, top_k=len(LABELS))
    assert [r["cell"] for r in by_anndata] == list(cells.obs_names)
    scores = np.array([[{t["label"]: t["score"] for t in r["top_labels"]}[label] for label in LABELS] for r in by_anndata])
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert [r["label"] for r in by_anndata] == [LABELS[i] for i in expected.argmax(1)]

    dicts = gene_dicts(cells)
    genes = list(pbmc.raw.var_names)
    dense = np.asarray(cells.raw.X.todense())
    variants = {
        "list of dicts": (dicts, {}),
        "payload": ({"genes": genes, "counts": dense.tolist(), "cell_ids": list(cells.obs_names)}, {}),
        "sparse matrix": (sparse.csr_matrix(dense), {"gene_names": genes}),
        "batch size 1": (cells, {"use_raw": True, "batch_size": 1}),
        "batch size 5": (cells, {"use_raw": True, "batch_size": 5}),
    }
    for name, (inputs, kwargs) in variants.items():
        out = annotator(inputs, labels=LABELS, top_k=len(LABELS), **kwargs)
        got = np.array([[{t["label"]: t["score"] for t in r["top_labels"]}[label] for label in LABELS] for r in out])
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)
    one = annotator(dicts[0], labels=LABELS)
    assert len(one) == 1 and one[0]["cell"] == "cell_0" and len(one[0]["top_labels"]) == 3  # top_k defaults to 3
    from_path = annotator(pbmc_path, labels=LABELS, use_raw=True, batch_size=256)
    assert len(from_path) == pbmc.n_obs
    json.dumps(from_path)


def test_description_and_text_to_cell_outputs(model, jobs, processor, pbmc):
    describe = pipeline("cell-description", model=model, processor=processor)
    assert isinstance(describe, CellDescriptionPipeline)
    out = describe(pbmc[:3], use_raw=True, max_new_tokens=4, batch_size=2)
    assert [o["cell"] for o in out] == list(pbmc.obs_names[:3])
    assert [o["generated_text"] for o in out] == jobs.describe(pbmc[:3], max_new_tokens=4, use_raw=True)
    json.dumps(out)

    to_cells = pipeline("text-to-cell", model=model, processor=processor)
    assert isinstance(to_cells, TextToCellPipeline)
    out = to_cells(TEXTS, n_per_text=2, seed=3, genes=["LYZ", "MS4A1", "NKG7"], batch_size=1)
    expected = jobs.generate_cells(TEXTS, n_per_text=2, seed=3, genes=["LYZ", "MS4A1", "NKG7"])
    assert out["gene_names"] == ["LYZ", "MS4A1", "NKG7"] and [c["text"] for c in out["cells"]] == expected.texts
    np.testing.assert_allclose([c["expression"] for c in out["cells"]], expected.expression, atol=1e-6)
    assert out["output"] == "mean"  # an MSE decoder's deterministic decoding
    json.dumps(out)
    adata = to_cells(TEXTS[0], return_anndata=True)
    assert adata.shape == (1, len(processor.feature_extractor.gene_names))


def test_text_to_cell_draws_counts_from_a_count_decoder(processor):
    sampler = ScMMGPTJobs(make_stage2(processor, expression_distribution="nb"), processor, verbose=False)
    to_cells = pipeline("text-to-cell", model=sampler.model, processor=processor)
    genes = ["LYZ", "MS4A1", "NKG7"]
    out = to_cells(TEXTS, n_per_text=3, seed=5, genes=genes, output="counts", library_size=5000)
    expected = sampler.generate_cells(TEXTS, n_per_text=3, seed=5, genes=genes, output="counts", library_size=5000)
    assert out["output"] == "counts"
    np.testing.assert_array_equal([c["expression"] for c in out["cells"]], expected.expression)
    assert np.all(np.mod(expected.expression, 1) == 0)
    with pytest.raises(ValueError, match="counts"):
        pipeline("text-to-cell", model=make_stage2(processor), processor=processor)(TEXTS, output="counts")


def test_bad_inputs_get_clear_errors(annotator, model, processor, pbmc):
    cases = [
        (lambda: annotator(pbmc[:2], use_raw=True), ValueError, "give labels"),
        (lambda: annotator(pbmc[:2], labels="CD19+ B", use_raw=True), ValueError, "must be a list of names"),
        (lambda: annotator(pbmc[:2], labels=LABELS, colour="red"), TypeError, "unknown cell-annotation parameters"),
        (lambda: annotator("missing.h5ad", labels=LABELS), FileNotFoundError, "no such file"),
        (lambda: annotator({"LYZ": -1.0}, labels=LABELS), ValueError, "non-negative"),
        (lambda: annotator({"LYZ": "high"}, labels=LABELS), TypeError, "must be a number"),
        (lambda: annotator({"genes": ["LYZ", "NKG7"], "counts": [[1, 2], [3]]}, labels=LABELS), ValueError,
         r"\"counts\"\[1\] has 1 values"),
        (lambda: annotator({"genes": ["LYZ"], "counts": [[float("nan")]]}, labels=LABELS), ValueError, "NaN or infinite"),
        (lambda: annotator(np.ones((2, 3)), labels=LABELS), ValueError, "needs gene_names"),
        (lambda: annotator(42, labels=LABELS), TypeError, "cannot read cells from a int"),
        (lambda: annotator(pbmc[:2], labels=LABELS, use_raw=True, batch_size=0), ValueError, "positive integer"),
        (lambda: annotator({"NOT_A_GENE": 1.0}, labels=LABELS), ValueError, "none of the 1 genes"),
        (lambda: annotator(pbmc[:2], labels=["a", "a"], use_raw=True), ValueError, "duplicates"),
        (lambda: annotator(anndata.AnnData(pbmc.X[:2], var=pbmc.var), labels=LABELS), ValueError, "scaled / centred"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    to_cells = pipeline("text-to-cell", model=model, processor=processor)
    for texts in ([], "", ["cell type: B cell.", " "]):
        with pytest.raises(ValueError, match="non-empty"):
            to_cells(texts)
    with pytest.raises(ValueError, match="n_per_text must be a positive integer"):
        to_cells("cell type: B cell.", n_per_text=0)
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        to_cells("x", genes=["NOT_A_GENE"])
    stage1 = ScMMGPTModel(tiny_config(processor)).eval()
    with pytest.raises(ValueError, match="needs a model that does describe"):
        CellDescriptionPipeline(model=stage1, processor=processor, task="cell-description")


def test_read_cells_accepts_documented_shapes(pbmc, processor):
    tokenizer = processor.feature_extractor
    cells = read_cells({"LYZ": 2, "NKG7": 1.5}, tokenizer)
    assert cells.matrix.shape == (1, 2) and cells.gene_names == ["LYZ", "NKG7"] and cells.cell_ids == ["cell_0"]
    cells = read_cells([{"LYZ": 2}, {"NKG7": 1}], tokenizer)
    assert cells.matrix.toarray().tolist() == [[2.0, 0.0], [0.0, 1.0]] and cells.cell_ids == ["cell_0", "cell_1"]
    assert cells.value_kind == "counts" and cells.normalize
    cells = read_cells({"genes": ["LYZ", "NKG7"], "counts": [1, 2]}, tokenizer)  # one cell as a flat list
    assert cells.matrix.shape == (1, 2)
    cells = read_cells(pbmc[:3], tokenizer)  # scaled .X: the log-normalised .raw, and said so
    assert cells.source == ".raw" and cells.cell_ids == list(pbmc.obs_names[:3]) and not cells.normalize
    assert "scaled" in cells.decision


# ---------------------------------------------------------------------------------------------------- fresh process
def test_each_pipeline_loads_by_remote_code_in_a_fresh_process(model_dir, jobs, pbmc, pbmc_path, tmp_path):
    annotation = jobs.annotate(pbmc, LABELS, use_raw=True).scores
    by_id = jobs.annotate(pbmc[:8], ["B cell", "CL:0000623"], use_raw=True)
    dicts = gene_dicts(pbmc[:2])
    texts = jobs.describe(pbmc[:2], max_new_tokens=4, use_raw=True)
    generated = jobs.generate_cells(TEXTS, n_per_text=2, seed=0, genes=["LYZ", "MS4A1"])
    (tmp_path / "inputs.json").write_text(json.dumps({"dicts": dicts}))
    out = run_fresh_python(
        f"""
        import anndata, json, sys
        # a base install: labels resolve in the shipped ontology, never cellxgene-ontology-guide's
        sys.modules["cellxgene_ontology_guide"] = sys.modules["zstandard"] = None
        from transformers import pipeline
        folder, results = {model_dir!r}, {{}}
        annotate = pipeline("cell-annotation", model=folder, trust_remote_code=True)
        assert type(annotate).__module__.startswith("transformers_modules"), type(annotate).__module__
        assert type(annotate.model).__module__.startswith("transformers_modules")
        results["annotate"] = annotate({pbmc_path!r}, labels={LABELS!r}, top_k=4, use_raw=True, batch_size=128)
        results["by_id"] = annotate(anndata.read_h5ad({pbmc_path!r})[:8], labels=["B cell", "CL:0000623"], top_k=2,
                                    use_raw=True)
        # the module cache holds the folder's code, not its data: the ontology came from the folder
        ontology = next(m for name, m in sys.modules.items() if name.endswith(".ontology_scmmgpt"))
        assert ontology.shipped_ontology_file() is None and ontology.load_cell_ontology.cache_info().currsize == 1
        describe = pipeline("cell-description", model=folder, trust_remote_code=True)
        dicts = json.load(open("inputs.json"))["dicts"]
        results["describe"] = describe(dicts, max_new_tokens=4, batch_size=1)
        to_cells = pipeline("text-to-cell", model=folder, trust_remote_code=True)
        results["generate"] = to_cells({TEXTS!r}, n_per_text=2, seed=0, genes=["LYZ", "MS4A1"])
        print("RESULTS" + json.dumps(results))
        """,
        cwd=str(tmp_path),
    )
    results = json.loads(out.split("RESULTS", 1)[1])
    got = np.array([[{t["label"]: t["score"] for t in r["top_labels"]}[label] for label in LABELS]
                    for r in results["annotate"]])
    np.testing.assert_allclose(got, annotation, atol=1e-5)
    assert [r["cell"] for r in results["annotate"]] == list(pbmc.obs_names)
    assert [r["label"] for r in results["by_id"]] == by_id.predictions
    np.testing.assert_allclose([[{t["label"]: t["score"] for t in r["top_labels"]}[label] for label in by_id.labels]
                                for r in results["by_id"]], by_id.scores, atol=1e-5)
    assert by_id.labels == ["B cell", "natural killer cell"]
    assert [r["generated_text"] for r in results["describe"]] == texts
    np.testing.assert_allclose([c["expression"] for c in results["generate"]["cells"]], generated.expression, atol=1e-6)


def test_registered_pipeline_classes(annotator):
    from transformers.pipelines import PIPELINE_REGISTRY

    assert isinstance(annotator, CellAnnotationPipeline)
    for task in ("cell-annotation", "cell-description", "text-to-cell"):
        assert task in PIPELINE_REGISTRY.get_supported_tasks()
