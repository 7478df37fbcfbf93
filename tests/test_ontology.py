"""Cell Ontology text: the shipped (pruned) CL file, giving the texts of the full release, label mapping (PBMC table,
names, synonyms, ids), unmapped reports."""

import random

import pytest

from modeling_scmmgpt import ontology_scmmgpt
from modeling_scmmgpt.ontology_scmmgpt import shipped_ontology_file
from scmmgpt_train.ontology import (
    PBMC_BULK_LABELS,
    CellOntology,
    UnmappedLabelsError,
    cell_text,
    cell_type_text_variants,
    load_cell_ontology,
    newest_ontology_file,
    ontology_data_dir,
    ontology_texts,
)


@pytest.fixture(scope="module")
def cl():
    return load_cell_ontology()


def test_the_pruned_shipped_file_is_loaded_by_default(cl):
    assert shipped_ontology_file().name == "cell_ontology.json.gz"
    assert cl.terms == ontology_scmmgpt.load_cell_ontology(shipped_ontology_file()).terms
    assert cl.version.startswith("v20") and len(cl) > 2000
    assert cl.term("CL:0000236").name == "B cell"


def test_training_texts_from_the_shipped_file_equal_the_full_releases(cl):
    """Training reads the pruned copy: for the PBMC terms and 200 random ones, the names, definitions, synonyms and
    parents, and so the cell texts and their variants, are those of the full cellxgene-ontology-guide file."""
    release = ontology_data_dir() / f"CL-ontology-{cl.version}.json.zst"
    if not release.exists():
        pytest.skip(f"the installed cellxgene-ontology-guide no longer carries {release.name}")
    full = CellOntology(ontology_scmmgpt.load_cell_ontology(release).terms, cl.version)
    ids = [*PBMC_BULK_LABELS.values(), *random.Random(0).sample(sorted(full.terms), 200)]
    fields = ("name", "definition", "synonyms", "parents")
    for term_id in ids:
        assert [getattr(cl.terms[term_id], f) for f in fields] == [getattr(full.terms[term_id], f) for f in fields]
    assert [cell_text(cl.term(i)) for i in ids] == [cell_text(full.term(i)) for i in ids]
    assert cell_type_text_variants(ids, cl) == cell_type_text_variants(ids, full)
    labels = [*PBMC_BULK_LABELS, "NK cell", "B lymphocyte", "Treg"]
    assert cl.map_labels(labels).to_dict() == full.map_labels(labels).to_dict()


def test_newest_file_is_chosen_by_version_not_by_listing_order(tmp_path):
    for version in ("v2025-12-01", "v2026-01-02", "v2025-02-13"):
        (tmp_path / f"CL-ontology-{version}.json.zst").touch()
    assert newest_ontology_file(tmp_path).name == "CL-ontology-v2026-01-02.json.zst"


def test_every_pbmc_bulk_label_maps_to_a_defined_term(cl, pbmc):
    labels = list(pbmc.obs["bulk_labels"].astype(str))
    mapping = cl.map_labels(labels)
    assert not mapping.unmapped
    assert set(mapping.terms) == set(PBMC_BULK_LABELS) == set(labels)
    for label, term in mapping.terms.items():
        assert term.id == PBMC_BULK_LABELS[label] and not term.deprecated
        assert len(term.definition) > 20, (label, term)
    assert mapping.terms["CD14+ Monocyte"].id == "CL:0001054"


@pytest.mark.parametrize(
    "label, term_id",
    [
        ("B cell", "CL:0000236"),  # exact name
        ("  b CELL ", "CL:0000236"),  # case and whitespace
        ("B lymphocyte", "CL:0000236"),  # synonym
        ("Treg", "CL:0000815"),  # synonym
        ("cl_0000236", "CL:0000236"),  # a CL id
        ("cd14+ monocyte", "CL:0001054"),  # the PBMC table, case-insensitive
    ],
)
def test_lookup_by_name_synonym_id_and_table(cl, label, term_id):
    assert cl.lookup(label).id == term_id


def test_explicit_label_map_wins(cl):
    assert cl.lookup("my T cells", label_map={"my T cells": "CL:0000084"}).name == "T cell"


def test_obsolete_terms_follow_replaced_by_and_are_not_matched_by_name(cl):
    obsolete = next(t for t in cl.terms.values() if t.deprecated and t.replaced_by in cl.terms)
    assert cl.term(obsolete.id).id == obsolete.replaced_by
    assert cl.lookup(obsolete.name) is None or not cl.lookup(obsolete.name).deprecated


def test_unmapped_labels_are_reported_with_counts_never_dropped(cl):
    mapping = cl.map_labels(["B cell", "Martian cell", "Martian cell", "unknown", float("nan")])
    assert set(mapping.terms) == {"B cell"}
    assert mapping.unmapped["Martian cell"] == 2
    assert mapping.unmapped["unknown"] == 1 and mapping.unmapped["nan"] == 1
    with pytest.raises(UnmappedLabelsError, match=r"my\.h5ad.*'Martian cell' \(2 cells\)"):
        mapping.raise_if_unmapped("my.h5ad")


def test_cell_text_has_name_definition_and_known_context(cl):
    term = cl.term("CL:0001054")
    text = cell_text(term, context={"tissue": "blood", "disease": "unknown", "development_stage": "adult"})
    assert text == f"cell type: CD14-positive monocyte. {term.definition} Tissue: blood. Development stage: adult."
    assert cell_text(None, "Martian cell") == "cell type: Martian cell."


def test_ontology_texts_cover_the_live_defined_terms(cl):
    texts = ontology_texts(cl)
    live_defined = [t for t in cl.terms.values() if t.definition and not t.deprecated]
    assert len(texts) == len(live_defined) > 2000
    assert all(name and definition for name, definition in texts)
    assert ("B cell", cl.term("CL:0000236").definition) in texts
