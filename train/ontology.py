"""Cell Ontology (CL) text for the cells of a dataset: `"cell type: {name}. {definition}"`, offline.

The ontology itself — `CLTerm` (name, definition, synonyms, parents), `CellOntology` (lookup by id, name, synonym;
`ancestors`), `load_cell_ontology`, `cell_type_text` — lives in `modeling_scmmgpt.ontology_scmmgpt`, which the jobs
use to resolve `annotate` labels too; this module re-exports it and adds what building a dataset needs: the PBMC table
as the built-in label map, `map_labels` with its report of unmapped labels, and cell texts with metadata context.
A term's `synonyms` and its parents (`CellOntology.ancestors(term_id)`, nearest first) are there for text variety.

Free-text labels map to terms by (1) an explicit table (scanpy's PBMC `bulk_labels`), (2) a CL id, (3) the exact term
name, (4) an exact synonym, each case-insensitively. Labels that map to nothing are reported in a `LabelMapping`,
never dropped: `LabelMapping.raise_if_unmapped()` turns them into an `UnmappedLabelsError`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from modeling_scmmgpt import ontology_scmmgpt
from modeling_scmmgpt.ontology_scmmgpt import (
    CLTerm,
    cell_type_text,
    newest_ontology_file,
    normalise_name,
    ontology_data_dir,
)

# The 10 `bulk_labels` of scanpy's `pbmc68k_reduced` (Zheng et al. 2017's bead-sorted populations) → CL ids.
# Chosen as the most specific CL term that states exactly the sorting markers of each population.
PBMC_BULK_LABELS: dict[str, str] = {
    "Dendritic": "CL:0000451",  # dendritic cell
    "CD14+ Monocyte": "CL:0001054",  # CD14-positive monocyte
    "CD19+ B": "CL:0000236",  # B cell
    "CD4+/CD25 T Reg": "CL:0000792",  # CD4-positive, CD25-positive, alpha-beta regulatory T cell
    "CD8+ Cytotoxic T": "CL:0000794",  # CD8-positive, alpha-beta cytotoxic T cell
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",  # naive thymus-derived CD8-positive, alpha-beta T cell
    "CD56+ NK": "CL:0000623",  # natural killer cell
    "CD4+/CD45RO+ Memory": "CL:0000897",  # CD4-positive, alpha-beta memory T cell
    "CD34+": "CL:0008001",  # hematopoietic precursor cell (the CD34+ sort holds stem and progenitor cells)
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",  # naive thymus-derived CD4-positive, alpha-beta T cell
}

# CELLxGENE obs columns (labels, not ids) that add a sentence to a cell's text, with the sentence's lead word.
CONTEXT_COLUMNS: dict[str, str] = {
    "tissue": "Tissue",
    "disease": "Disease",
    "development_stage": "Development stage",
}
_MISSING = {"", "unknown", "na", "nan", "none"}


class UnmappedLabelsError(ValueError):
    """Raised when cell-type labels map to no Cell Ontology term. `summary` names the source and the labels; the message
    adds the API's two ways out (`scmmgpt build-dataset` names its flags instead)."""

    def __init__(self, summary: str):
        self.summary = summary
        super().__init__(f"{summary}. Pass `label_map={{label: 'CL:…'}}` for them, or `on_unmapped='label_only'` to "
                         "keep them with label-only text.")


@dataclass
class LabelMapping:
    """The outcome of mapping free-text labels to CL terms.

    `terms[label]` is the term of each mapped label; `unmapped[label]` the number of cells carrying each label that
    mapped to nothing (a report, so that no label is silently dropped).
    """

    terms: dict[str, CLTerm] = field(default_factory=dict)
    unmapped: dict[str, int] = field(default_factory=dict)

    def raise_if_unmapped(self, source: str = "labels"):
        """Raise `UnmappedLabelsError` naming `source` and every unmapped label with its cell count."""
        if self.unmapped:
            listed = ", ".join(f"{label!r} ({n} cells)" for label, n in sorted(self.unmapped.items()))
            raise UnmappedLabelsError(
                f"{source}: {len(self.unmapped)} cell-type labels map to no Cell Ontology term: {listed}")

    def to_dict(self) -> dict:
        return {"mapped": {label: term.id for label, term in self.terms.items()}, "unmapped": dict(self.unmapped)}


def is_missing(value) -> bool:
    """True for NaN / None / empty / 'unknown' metadata values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return normalise_name(value) in _MISSING


class CellOntology(ontology_scmmgpt.CellOntology):
    """The Cell Ontology (`modeling_scmmgpt.ontology_scmmgpt.CellOntology`) with the PBMC table under any
    `label_map`, and `map_labels` for a dataset's labels.

    Args:
        terms: CL id → `CLTerm`; `load_cell_ontology()` builds it from the shipped file.
        version: the ontology release (e.g. `"v2026-03-26"`).
        label_map: label → CL id entries on top of `PBMC_BULK_LABELS`, consulted before names.
    """

    def __init__(self, terms: dict[str, CLTerm], version: str = "unknown", label_map: dict[str, str] | None = None):
        super().__init__(terms, version, {**PBMC_BULK_LABELS, **(label_map or {})})

    def map_labels(self, labels, label_map: dict[str, str] | None = None) -> LabelMapping:
        """Map each distinct label of `labels` (an iterable of str, one per cell) and count unmapped cells."""
        mapping = LabelMapping()
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        for label, n in counts.items():
            term = None if is_missing(label) else self.lookup(label, label_map)
            if term is None:
                mapping.unmapped[str(label)] = n
            else:
                mapping.terms[label] = term
        return mapping


@functools.lru_cache(maxsize=4)
def load_cell_ontology(path=None) -> CellOntology:
    """Load (and cache) the Cell Ontology, with the PBMC table: by default the pruned copy modeling_scmmgpt ships
    (`cell_ontology.json.gz`, so training texts are pinned to that release), or the file at `path` (a pruned
    `.json.gz`, or a cellxgene-ontology-guide `CL-ontology-*.json.zst` such as `newest_ontology_file()`)."""
    shipped = ontology_scmmgpt.load_cell_ontology(path)
    return CellOntology(shipped.terms, shipped.version)


def cell_text(term: CLTerm | None, label: str | None = None, context: dict | None = None) -> str:
    """The text of one cell: its CL name and definition, then one sentence per known `context` entry.

    Args:
        term: the cell's CL term; when None the text is built from `label` alone (an unmapped label kept on purpose).
        label: the free-text label, used when `term` is None.
        context: CELLxGENE metadata of the cell, e.g. `{"tissue": "blood", "disease": "normal"}`; keys outside
            `CONTEXT_COLUMNS` and missing values are ignored.
    """
    if term is None and label is None:
        raise ValueError("cell_text needs a CL term or a label")
    text = cell_type_text(term.name, term.definition) if term is not None else cell_type_text(str(label))
    for column, lead in CONTEXT_COLUMNS.items():
        value = (context or {}).get(column)
        if not is_missing(value):
            text += f" {lead}: {value}."
    return text


def cell_type_text_variants(term_ids, ontology: CellOntology | None = None) -> dict[str, tuple[str, list[str]]]:
    """Other ways to write each term's cell-type text, for text-side variety in training: `{CL id: (the text cells
    carry, [variants])}`. The variants are the text with each exact synonym in place of the name, the text followed by
    `"It is a kind of {parent}."` (its direct parents within CL), and the bare `"cell type: {name}."` (how label sets
    are often written). Ids that are not CL terms are left out."""
    ontology = ontology or load_cell_ontology()
    variants = {}
    for term_id in sorted({str(t) for t in term_ids}):
        if term_id not in ontology:
            continue
        term = ontology.term(term_id)
        text = cell_type_text(term.name, term.definition)
        parents = [ontology.term(p).name for p in term.parents if p in ontology]
        others = [cell_type_text(synonym, term.definition) for synonym in term.synonyms]
        others += [f"{text} It is a kind of {' and '.join(parents)}."] if parents else []
        others += [cell_type_text(term.name)] if term.definition else []
        variants[term_id] = (text, others)
    return variants


def ontology_texts(ontology: CellOntology | None = None) -> list[tuple[str, str]]:
    """All (name, definition) pairs of the live Cell Ontology terms that have a definition."""
    return (ontology or load_cell_ontology()).texts()


__all__ = [
    "CONTEXT_COLUMNS",
    "PBMC_BULK_LABELS",
    "CLTerm",
    "CellOntology",
    "LabelMapping",
    "UnmappedLabelsError",
    "cell_text",
    "cell_type_text_variants",
    "cell_type_text",
    "is_missing",
    "load_cell_ontology",
    "newest_ontology_file",
    "normalise_name",
    "ontology_data_dir",
    "ontology_texts",
]
