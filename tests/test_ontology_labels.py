"""`annotate` labels from the Cell Ontology: a model's own label keeps its text, a CL id (either spelling) or a term
name / exact synonym (any case) is scored by its term's text, anything else is a one-line error with close matches;
explicit label texts win; the CLI records the resolved texts and CL ids; the ontology core lives in the modeling layer
and `scmmgpt_train.ontology` keeps its API on top of it; the ontology is a pruned copy shipped in the package, equal to
the cellxgene-ontology-guide release it was cut from, so a base install (and remote code) needs neither that package
nor zstandard."""

import gzip
import json
import runpy
import sys
import warnings
from pathlib import Path

import anndata
import numpy as np
import pytest
import zstandard

from modeling_scmmgpt import ScMMGPTJobs, ontology_scmmgpt
from modeling_scmmgpt.cli import main
from modeling_scmmgpt.ontology_scmmgpt import (
    cell_type_terms,
    cell_type_text,
    load_cell_ontology,
    newest_ontology_file,
    ontology_data_dir,
    prune_cell_ontology,
    shipped_ontology_file,
)

from .conftest import TINY_LABEL_TEXTS


@pytest.fixture(scope="module")
def cl():
    return load_cell_ontology()


@pytest.fixture(scope="module")
def jobs(tiny_model_dir):
    return ScMMGPTJobs.from_pretrained(tiny_model_dir, progress=False, verbose=False)


@pytest.fixture(scope="module")
def cells(pbmc):
    return anndata.AnnData(X=pbmc.raw.X[:6].copy(), var=pbmc.raw.var.copy())


@pytest.fixture
def scored_texts(jobs, monkeypatch):
    """The label texts the retrieval scorer encodes, call by call."""
    seen, encode = [], jobs._text_features

    def recording(texts):
        seen.append(list(texts))
        return encode(texts)

    monkeypatch.setattr(jobs, "_text_features", recording)
    return seen


def _text(cl, term_id):
    term = cl.term(term_id)
    return cell_type_text(term.name, term.definition)


# ---------------------------------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("label", ["CL:0000623", "CL_0000623", "cl_0000623", "natural killer cell",
                                   "Natural Killer CELL", "  natural  killer cell ", "NK cell", "nk cell"])
def test_cl_ids_names_and_synonyms_resolve_to_their_term(label):
    assert cell_type_terms([label])[label].id == "CL:0000623"


def test_model_labels_ids_names_and_synonyms_get_their_texts(jobs, cells, cl, scored_texts):
    labels = ["CD14+ Monocyte", "CL:0000623", "CL_0000084", "b CELL", "Treg"]
    result = jobs.annotate(cells, labels, subtypes=False)  # each label by its own text alone
    # a CL id comes back as its term's name; names and synonyms as the user wrote them
    assert result.labels == ["CD14+ Monocyte", "natural killer cell", "T cell", "b CELL", "Treg"]
    assert set(result.predictions) <= set(result.labels)
    assert result.label_ids == [None, "CL:0000623", "CL:0000084", "CL:0000236", "CL:0000815"]
    expected = [TINY_LABEL_TEXTS["CD14+ Monocyte"]] + [_text(cl, i) for i in result.label_ids[1:]]
    assert result.label_texts == expected and scored_texts == [expected]
    assert expected[1].startswith("cell type: natural killer cell. A lymphocyte that can spontaneously kill")


def test_coarser_ontology_labels_score_as_the_trained_types_they_cover(jobs, cells, scored_texts):
    """"monocyte" takes the best of its own text and the model's CD14+ Monocyte's; each trained type counts for the
    nearest label above it only ("monocyte", not "leukocyte"); a trained label asked for itself is nobody's subtype."""
    own = list(TINY_LABEL_TEXTS)  # Dendritic, CD14+ Monocyte, CD19+ B
    plain = jobs.annotate(cells, ["monocyte", "leukocyte", "B cell"], subtypes=False)
    trained = jobs.annotate(cells, own)
    result = jobs.annotate(cells, ["monocyte", "leukocyte", "B cell"])
    assert result.subtypes == {"monocyte": ["CD14+ Monocyte"], "leukocyte": ["Dendritic"], "B cell": ["CD19+ B"]}
    assert scored_texts[-1] == plain.label_texts + [TINY_LABEL_TEXTS[label] for label in ("Dendritic",
                                                                                        "CD14+ Monocyte", "CD19+ B")]
    expected = np.maximum(plain.scores, trained.scores[:, [own.index("CD14+ Monocyte"), own.index("Dendritic"),
                                                           own.index("CD19+ B")]])
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert result.predictions == [result.labels[i] for i in expected.argmax(1)]
    assert plain.subtypes is None and result.label_texts == plain.label_texts
    asked = jobs.annotate(cells, ["leukocyte", "Dendritic", "CD19+ B"])
    assert asked.subtypes == {"leukocyte": ["CD14+ Monocyte"]}


def test_default_labels_are_the_models_own(jobs, cells):
    result = jobs.annotate(cells)
    assert result.labels == list(TINY_LABEL_TEXTS) and result.label_texts == list(TINY_LABEL_TEXTS.values())
    assert result.label_ids == [None] * len(TINY_LABEL_TEXTS)


def test_explicit_label_texts_win_over_model_and_ontology(jobs, cells, cl, scored_texts):
    mine = "cell type: B cell. My own words for it."
    as_list = jobs.annotate(cells, ["CD19+ B", "B cell"], label_texts=[mine, mine + " Again."])
    assert as_list.label_texts == [mine, mine + " Again."] and as_list.label_ids == [None, None]
    # a dict gives texts to some labels (free text on purpose); the others resolve as usual
    as_dict = jobs.annotate(cells, ["Martian cell", "NK cell", "Dendritic"],
                            label_texts={"Martian cell": "cell type: Martian cell. Green."})
    assert as_dict.label_texts == ["cell type: Martian cell. Green.", _text(cl, "CL:0000623"),
                                   TINY_LABEL_TEXTS["Dendritic"]]
    assert as_dict.label_ids == [None, "CL:0000623", None]
    # without labels, a dict's labels are the candidates
    only = jobs.annotate(cells, label_texts={"Martian cell": "cell type: Martian cell."})
    assert only.labels == ["Martian cell"] and scored_texts[-1] == ["cell type: Martian cell."]


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_labels_get_one_line_with_close_matches(jobs, cells):
    with pytest.raises(ValueError) as error:
        jobs.annotate(cells, ["B cel", "CD19+B", "Martian xyzzy", "CL:9999999", "CL:0000002"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("unknown cell types 'B cel' (close matches: 'B cell'")
    assert "'CD19+B' (close matches: 'CD19+ B'" in message  # the model's own labels are suggested too
    assert "'Martian xyzzy' (no close match)" in message
    assert "'CL:9999999' (no such id in the Cell Ontology v" in message
    assert "'CL:0000002' (an obsolete term: obsolete immortal cell line cell)" in message
    assert "not a label of this model, a CL id or a Cell Ontology name or synonym" in message
    assert "label_texts" in message and "--label-texts" in message
    with pytest.raises(ValueError, match=r"^unknown cell type 'B cel' \(close matches: 'B cell', [^)]*\): not a"):
        jobs.annotate(cells, ["B cel"])


def test_one_cell_type_twice_is_refused(jobs, cells):
    with pytest.raises(ValueError, match=r"labels 'NK cell' and 'CL:0000623' are one cell type \(CL:0000623\)"):
        jobs.annotate(cells, ["NK cell", "CL:0000623"])
    with pytest.raises(ValueError, match=r"'B cell' and 'CL:0000236' are one cell type \(B cell\)"):
        jobs.annotate(cells, ["B cell", "CL:0000236"])


@pytest.mark.parametrize("package", ["cellxgene_ontology_guide", "zstandard"])
def test_ontology_labels_need_no_ontology_package_and_the_full_file_names_them(jobs, cells, cl, monkeypatch, package):
    load_cell_ontology.cache_clear()
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: a base install
    result = jobs.annotate(cells, ["CD19+ B", "B cell", "CL:0000623"])
    assert result.label_ids == [None, "CL:0000236", "CL:0000623"] and result.label_texts[2] == _text(cl, "CL:0000623")
    with pytest.raises(ImportError, match=r"cellxgene-ontology-guide and zstandard.*pip install 'scmmgpt\[ontology\]'"):
        load_cell_ontology(newest_ontology_file())  # the full / a newer release needs them


def test_remote_code_finds_the_shipped_file_in_the_model_folder(jobs, cells, tiny_model_dir, monkeypatch, tmp_path):
    # remote code runs from transformers' module cache, which holds the folder's .py files and none of its data
    monkeypatch.setattr(ontology_scmmgpt, "__file__", str(tmp_path / "ontology_scmmgpt.py"))
    assert shipped_ontology_file() is None
    assert shipped_ontology_file(tiny_model_dir) == tiny_model_dir / "cell_ontology.json.gz"
    assert cell_type_terms(["NK cell"], model_dir=tiny_model_dir)["NK cell"].id == "CL:0000623"
    assert jobs.annotate(cells, ["B cell", "NK cell"]).label_ids == ["CL:0000236", "CL:0000623"]  # the jobs' folder
    with pytest.raises(FileNotFoundError, match=r"^'B cell': not labels of this model, and reading labels as Cell "
                                                r"Ontology names or CL ids needs cell_ontology.json.gz, which is "
                                                r"neither next to ontology_scmmgpt.py nor in the model folder"):
        cell_type_terms(["B cell"], model_dir=tmp_path)
    assert jobs.annotate(cells, ["CD19+ B", "Dendritic"]).labels == ["CD19+ B", "Dendritic"]


def test_remote_code_loading_never_requires_the_ontology_packages():
    from transformers.dynamic_module_utils import get_imports

    imported = set(get_imports(ontology_scmmgpt.__file__))
    assert not imported & {"zstandard", "cellxgene_ontology_guide"}, imported


# ---------------------------------------------------------------------------------------------------- the ontology
@pytest.fixture(scope="module")
def release(cl):
    """The cellxgene-ontology-guide file the shipped ontology was cut from."""
    path = ontology_data_dir() / f"CL-ontology-{cl.version}.json.zst"
    if not path.exists():
        pytest.skip(f"the installed cellxgene-ontology-guide no longer carries {path.name}")
    return path


def test_the_shipped_file_is_the_pruned_guide_release(cl, release):
    """The pruned copy holds every term of the cellxgene-ontology-guide release it was cut from, exactly as `CLTerm`s
    from that release (in its order, which decides name clashes), and regenerates to the same content."""
    full = load_cell_ontology(release)
    assert cl.version == full.version and len(cl) == len(full) > 2000
    assert list(cl.terms.items()) == list(full.terms.items())
    assert cl.texts(include_deprecated=True) == full.texts(include_deprecated=True)
    with gzip.open(shipped_ontology_file(), "rt", encoding="utf-8") as f:
        shipped = json.load(f)
    assert shipped == {**prune_cell_ontology(release), "source": shipped["source"]}
    assert shipped_ontology_file().stat().st_size < 500_000  # a light file in every wheel and model folder


def test_the_regeneration_command_writes_the_shipped_content(cl, release, tmp_path, capsys):
    tool = runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "prune_cell_ontology.py"))
    assert tool["main"]([str(tmp_path / "cl.json.gz"), "--source", str(release)]) == 0
    assert f"Cell Ontology {cl.version}, {len(cl)} terms" in capsys.readouterr().out
    written, shipped = (json.loads(gzip.decompress(p.read_bytes())) for p in (tmp_path / "cl.json.gz",
                                                                             shipped_ontology_file()))
    assert {**written, "source": ""} == {**shipped, "source": ""}


def test_parents_and_ancestors_follow_the_shipped_hierarchy(cl, release):
    with open(release, "rb") as f:
        shipped = json.loads(zstandard.ZstdDecompressor().stream_reader(f).read())
    assert cl.term("CL:0000623").parents == ("CL:0001067",)  # natural killer cell is_a group 1 innate lymphoid cell
    for term_id, entry in shipped.items():
        # a few classes (cytoplasm kinds) reach 'cell' only through non-CL terms: no CL parent to follow
        if not entry["deprecated"] and cl.terms[term_id].parents:
            assert {t.id for t in cl.ancestors(term_id)} == set(entry["ancestors"]), term_id
    names = [t.name for t in cl.ancestors("CL:0000236")]
    assert names[0] == "lymphocyte of B lineage" and names[-1] == "cell" and "leukocyte" in names


def test_the_training_layer_keeps_its_api_on_the_shared_core(cl):
    from scmmgpt_train import ontology as train_ontology

    train_cl = train_ontology.load_cell_ontology()
    assert train_ontology.CLTerm is ontology_scmmgpt.CLTerm
    assert train_ontology.cell_type_text is ontology_scmmgpt.cell_type_text
    assert isinstance(train_cl, ontology_scmmgpt.CellOntology) and train_cl.terms == cl.terms
    # the PBMC table is the dataset side's: training maps "CD19+ B", annotate does not guess it
    assert train_cl.lookup("CD19+ B").id == "CL:0000236" and cl.lookup("CD19+ B") is None
    assert train_cl.map_labels(["NK cell", "Martian"]).unmapped == {"Martian": 1}
    assert train_cl.ancestors("CL:0000623")[0].id == "CL:0001067"


# ---------------------------------------------------------------------------------------------------- the CLI
def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(path)


def test_cli_annotates_with_ontology_labels_and_records_them(tiny_model_dir, cells, cl, tmp_path, capsys):
    source, out = tmp_path / "cells.h5ad", tmp_path / "out.h5ad"
    cells.write_h5ad(source)
    assert main(["annotate", str(tiny_model_dir), str(source), "-o", str(out), "--labels", "B cell",
                 "CL:0000623", "CD14+ Monocyte"]) == 0
    annotated = _read(out)
    predicted = annotated.obs["scmmgpt_cell_type"]
    assert set(predicted) <= {"B cell", "natural killer cell", "CD14+ Monocyte"}
    ids = {"B cell": "CL:0000236", "natural killer cell": "CL:0000623", "CD14+ Monocyte": np.nan}
    np.testing.assert_array_equal(annotated.obs["scmmgpt_cell_type_ontology_term_id"].astype(object).fillna("-"),
                                  [ids[p] if isinstance(ids[p], str) else "-" for p in predicted])
    record = annotated.uns["scmmgpt"]
    assert list(record["labels"]) == ["B cell", "natural killer cell", "CD14+ Monocyte"]
    assert list(record["label_ids"]) == ["CL:0000236", "CL:0000623", ""]
    assert list(record["label_texts"]) == [_text(cl, "CL:0000236"), _text(cl, "CL:0000623"),
                                           TINY_LABEL_TEXTS["CD14+ Monocyte"]]
    assert record["cell_ontology"] == cl.version
    assert json.loads(record["label_subtypes"]) == {"B cell": ["CD19+ B"]}

    capsys.readouterr()
    assert main(["annotate", str(tiny_model_dir), str(source), "-o", str(out), "--labels", "B cel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the input decision, then the error in one line
    assert err[-1].startswith("scmmgpt annotate: error: unknown cell type 'B cel' (close matches: 'B cell'"), err
    assert sum("error" in line for line in err) == 1, err

    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps({"Martian cell": "cell type: Martian cell. Green.", "B cell": "cell type: B cell."}))
    assert main(["annotate", str(tiny_model_dir), str(source), "-o", str(out), "--label-texts", str(texts)]) == 0
    record = _read(out).uns["scmmgpt"]
    assert list(record["labels"]) == ["Martian cell", "B cell"] and list(record["label_ids"]) == ["", ""]
    assert "scmmgpt_cell_type_ontology_term_id" not in _read(out).obs
    texts.write_text("[1, 2]")
    assert main(["annotate", str(tiny_model_dir), str(source), "-o", str(out), "--label-texts", str(texts)]) == 2
    assert "must be a JSON object of label → non-empty text" in capsys.readouterr().err
