"""The Inference Endpoints handler (`hub_cards/handler.py`): JSON requests for the three tasks round-trip, bad requests
get a clear error message instead of an exception, and it runs from a model folder where scMMGPT is not installed."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from .conftest import run_fresh_python
from .test_pipelines import make_processor, make_stage2, save_model_folder

CARDS = Path(__file__).resolve().parent.parent / "hub_cards"


def load_handler_module():
    spec = importlib.util.spec_from_file_location("scmmgpt_endpoint_handler", CARDS / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example(name: str) -> dict:
    return json.loads((CARDS / "examples" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def handler_module():
    return load_handler_module()


@pytest.fixture(scope="module")
def model_dir(pbmc, minilm_tokenizer, tmp_path_factory):
    processor = make_processor(pbmc, minilm_tokenizer)
    folder = save_model_folder(make_stage2(processor), processor, tmp_path_factory.mktemp("handler") / "endpoint")
    shutil.copyfile(CARDS / "handler.py", Path(folder) / "handler.py")
    # the label texts of a trained model, so that the example request's dataset labels are the model's own
    texts = {label: f"cell type: {label}." for label in example("annotate")["parameters"]["labels"]}
    (Path(folder) / "label_texts.json").write_text(json.dumps(texts))
    return folder


@pytest.fixture(scope="module")
def handler(handler_module, model_dir):
    return handler_module.EndpointHandler(model_dir)


def round_trip(handler, request):
    """Send a request as an endpoint would (JSON text in, JSON text out)."""
    return json.loads(json.dumps(handler(json.loads(json.dumps(request)))))


def test_good_requests_round_trip(handler):
    request = example("annotate")
    out = round_trip(handler, request)
    assert [r["cell"] for r in out] == request["inputs"]["cell_ids"]
    assert all(r["label"] in request["parameters"]["labels"] and len(r["top_labels"]) == 2 for r in out)
    # the same request as JSON text or bytes, as some clients send it
    assert handler(json.dumps(request)) == out and handler(json.dumps(request).encode()) == out
    likelihood = round_trip(handler, {**request, "parameters": {**request["parameters"], "method": "likelihood"}})
    assert len(likelihood) == 2

    out = round_trip(handler, example("describe"))
    assert len(out) == 1 and out[0]["cell"] == "cell_0" and isinstance(out[0]["generated_text"], str)

    request = example("generate")
    out = round_trip(handler, request)
    assert out["gene_names"] == request["parameters"]["genes"]
    assert len(out["cells"]) == 2 and all(len(c["expression"]) == 3 for c in out["cells"])
    assert round_trip(handler, request) == out  # seeded: the same request gives the same cells


BAD_REQUESTS = [
    ('{"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "annotate"', "not valid JSON"),
    ([1, 2, 3], "must be a JSON object"),
    ({"inputs": {}, "task": "cluster"}, '"task" must be one of'),
    ({"task": "annotate", "parameters": {"labels": ["a"]}}, 'no "inputs"'),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "annotate", "parameters": {"labels": ["B cel"]}},
     "unknown cell type 'B cel' (close matches: 'B cell'"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "annotate", "parameters": {"labels": []}},
     "labels must be a non-empty list"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "annotate", "parameters": {"labels": ["a", "a"]}},
     "has duplicates"),
    ({"inputs": {"genes": ["LYZ", "NKG7"], "counts": [[1, 2], [3]]}, "task": "annotate",
      "parameters": {"labels": ["a"]}}, '"counts"[1] has 1 values but "genes" has 2'),
    ({"inputs": {"genes": ["LYZ"], "counts": [["many"]]}, "task": "annotate", "parameters": {"labels": ["a"]}},
     "(gene 'LYZ') must be a number"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[-3]]}, "task": "annotate", "parameters": {"labels": ["a"]}},
     "scaled / centred values (negative entries)"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[True]]}, "task": "annotate", "parameters": {"labels": ["a"]}},
     "must be a number"),
    ({"inputs": {"genes": "LYZ", "counts": [[1]]}, "task": "annotate", "parameters": {"labels": ["a"]}},
     '"genes" must be a non-empty list'),
    ({"inputs": {"genes": ["LYZ"], "counts": 5}, "task": "annotate", "parameters": {"labels": ["a"]}},
     '"counts" must be a non-empty list'),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]], "extra": 1}, "task": "annotate", "parameters": {"labels": ["a"]}},
     "unknown keys ['extra']"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "annotate",
      "parameters": {"labels": ["a"], "method": "vote"}}, "method 'vote' is not one of"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "annotate",
      "parameters": {"labels": ["a"], "batch_size": 0}}, "parameters.batch_size must be an integer from 1"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "annotate",
      "parameters": {"labels": ["a"], "temperature": 0.5}}, "unknown parameters for task 'annotate'"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "describe", "parameters": {"max_new_tokens": 10**6}},
     "parameters.max_new_tokens must be an integer from 1 to 512"),
    ({"inputs": {"genes": ["LYZ"], "counts": [[1]]}, "task": "describe", "parameters": {"prompt": "no placeholder"}},
     "exactly one <cell>"),
    ({"inputs": {"texts": []}, "task": "generate"}, "give a text or a non-empty list of texts"),
    ({"inputs": {"texts": [""]}, "task": "generate"}, "every text must be a non-empty string"),
    ({"inputs": {"texts": ["x"]}, "task": "generate", "parameters": {"n_per_text": 0}},
     "parameters.n_per_text must be an integer from 1"),
    ({"inputs": {"texts": ["x"]}, "task": "generate", "parameters": {"genes": ["NOT_A_GENE"]}},
     "not in the model's vocabulary"),
    ({"inputs": {"genes": ["NOT_A_GENE"], "counts": [[1]]}, "task": "annotate", "parameters": {"labels": ["CD19+ B"]}},
     "none of the 1 genes"),
]


@pytest.mark.parametrize("request_, message", BAD_REQUESTS, ids=[m[:40] for _, m in BAD_REQUESTS])
def test_bad_requests_get_an_error_message(handler, request_, message):
    out = handler(request_)
    assert set(out) == {"error"}, out
    assert message in out["error"], out["error"]
    json.dumps(out)


def test_size_limits_and_unexpected_failures(handler, handler_module, monkeypatch):
    monkeypatch.setattr(handler_module, "MAX_CELLS", 2)
    out = handler({"inputs": {"genes": ["LYZ"], "counts": [[1], [2], [3]]}, "task": "annotate",
                   "parameters": {"labels": ["a"]}})
    assert "at most 2 per request" in out["error"]
    out = handler({"inputs": {"texts": ["a", "b"]}, "task": "generate", "parameters": {"n_per_text": 2}})
    assert "at most 2 per request" in out["error"]

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setitem(handler.pipelines, "cell-annotation", broken)
    out = handler(example("annotate"))
    assert out == {"error": "internal error (RuntimeError): CUDA out of memory"}


def test_handler_runs_where_scmmgpt_is_not_installed(model_dir, handler, tmp_path):
    expected = round_trip(handler, example("annotate"))
    (tmp_path / "request.json").write_text(json.dumps(example("annotate")))
    (tmp_path / "bad.json").write_text(json.dumps({"inputs": {"genes": ["LYZ"], "counts": [[-1]]}, "task": "annotate",
                                                   "parameters": {"labels": ["a"]}}))
    ontology_request = {**example("annotate"), "parameters": {"labels": ["B cell", "CL:0000623"], "top_k": 2}}
    expected_ontology = round_trip(handler, ontology_request)
    (tmp_path / "ontology.json").write_text(json.dumps(ontology_request))
    out = run_fresh_python(
        f"""
        import json, sys
        sys.modules["cellxgene_ontology_guide"] = sys.modules["zstandard"] = None  # a base install
        sys.path.insert(0, {model_dir!r})
        from handler import EndpointHandler
        handler = EndpointHandler({model_dir!r})
        assert type(handler.model).__module__.startswith("transformers_modules")
        good = handler(json.load(open("request.json")))
        bad = handler(open("bad.json").read())
        ontology = handler(json.load(open("ontology.json")))
        print("RESULTS" + json.dumps({{"good": good, "bad": bad, "ontology": ontology}}))
        """,
        cwd=str(tmp_path),
    )
    results = json.loads(out.split("RESULTS", 1)[1])
    assert [r["label"] for r in results["good"]] == [r["label"] for r in expected]
    # Cell Ontology labels resolve from the folder's copy of the ontology, a CL id named by its term
    assert [r["label"] for r in results["ontology"]] == [r["label"] for r in expected_ontology]
    assert {t["label"] for r in results["ontology"] for t in r["top_labels"]} == {"B cell", "natural killer cell"}
    assert "negative entries" in results["bad"]["error"]


def test_requirements_cover_the_handler_imports():
    lines = [line for line in (CARDS / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    names = {line.split(">")[0].split("=")[0].split("<")[0].strip() for line in lines}
    assert {"transformers", "anndata", "scipy", "numpy", "safetensors"} <= names
    assert not any("scmmgpt" in name for name in names)  # the model code comes from the model repository
