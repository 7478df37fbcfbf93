"""Cell Ontology (CL) text for cells: `"cell type: {name}. {definition}"`, offline.

The ontology is the one `cellxgene-ontology-guide` ships inside its wheel
(`cellxgene_ontology_guide/data/CL-ontology-<version>.json.zst`): a JSON object keyed by CL id, each term carrying
`label`, `description` (the definition), optional `synonyms`, `deprecated` and, for obsolete terms, `replaced_by`.

Free-text labels map to terms by (1) an explicit table (scanpy's PBMC `bulk_labels`), (2) a CL id, (3) the exact term
name, (4) an exact synonym, each case-insensitively. Labels that map to nothing are reported in a `LabelMapping`,
never dropped: `LabelMapping.raise_if_unmapped()` turns them into an `UnmappedLabelsError`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

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
_CL_ID = re.compile(r"^CL[:_]\d{7}$", re.IGNORECASE)


class UnmappedLabelsError(ValueError):
    """Raised when cell-type labels map to no Cell Ontology term. `summary` names the source and the labels; the message
    adds the API's two ways out (`scmmgpt build-dataset` names its flags instead)."""

    def __init__(self, summary: str):
        self.summary = summary
        super().__init__(f"{summary}. Pass `label_map={{label: 'CL:…'}}` for them, or `on_unmapped='label_only'` to "
                         "keep them with label-only text.")


@dataclass(frozen=True)
class CLTerm:
    """One Cell Ontology term."""

    id: str
    name: str
    definition: str
    synonyms: tuple[str, ...] = ()
    deprecated: bool = False
    replaced_by: str | None = None


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


def _normalise(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


def is_missing(value) -> bool:
    """True for NaN / None / empty / 'unknown' metadata values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return _normalise(value) in _MISSING


class CellOntology:
    """The Cell Ontology, indexed by id, name and synonym.

    Args:
        terms: CL id → `CLTerm`; `load_cell_ontology()` builds it from the shipped file.
        version: the ontology release (e.g. `"v2026-03-26"`).
    """

    def __init__(self, terms: dict[str, CLTerm], version: str = "unknown"):
        self.terms = terms
        self.version = version
        self._by_name: dict[str, str] = {}
        self._by_synonym: dict[str, str] = {}
        for term in terms.values():
            if term.deprecated:  # obsolete terms resolve by id only, never by a name match
                continue
            self._by_name.setdefault(_normalise(term.name), term.id)
            for synonym in term.synonyms:
                self._by_synonym.setdefault(_normalise(synonym), term.id)

    def __len__(self) -> int:
        return len(self.terms)

    def __contains__(self, term_id: str) -> bool:
        return term_id in self.terms

    def term(self, term_id: str) -> CLTerm:
        """The live term of a CL id (`CL:0000236` or `CL_0000236`), following `replaced_by` of obsolete ones."""
        term_id = str(term_id).strip().upper().replace("_", ":")
        if term_id not in self.terms:
            raise KeyError(f"{term_id} is not a term of the Cell Ontology {self.version}")
        term = self.terms[term_id]
        if term.deprecated and term.replaced_by in self.terms:
            return self.term(term.replaced_by)
        return term

    def lookup(self, label: str, label_map: dict[str, str] | None = None) -> CLTerm | None:
        """The term for a free-text label (explicit map, CL id, name, synonym; case-insensitive), or None."""
        key = _normalise(label)
        explicit = {_normalise(k): v for k, v in {**PBMC_BULK_LABELS, **(label_map or {})}.items()}
        if key in explicit:
            return self.term(explicit[key])
        if _CL_ID.match(str(label).strip()):
            return self.term(label) if str(label).strip().upper().replace("_", ":") in self.terms else None
        term_id = self._by_name.get(key) or self._by_synonym.get(key)
        return self.terms[term_id] if term_id else None

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

    def texts(self, include_deprecated: bool = False) -> list[tuple[str, str]]:
        """(name, definition) of every term that has a definition, in CL id order (a corpus for LLM pre-training)."""
        return [
            (t.name, t.definition)
            for _, t in sorted(self.terms.items())
            if t.definition and (include_deprecated or not t.deprecated)
        ]


def ontology_data_dir() -> Path:
    """The `data/` folder of the installed `cellxgene-ontology-guide` package."""
    spec = importlib.util.find_spec("cellxgene_ontology_guide")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the Cell Ontology ships with `cellxgene-ontology-guide`; install it (pip install 'scmmgpt[train]')"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _version_key(path: Path) -> tuple:
    """Sort key of `CL-ontology-v2026-03-26.json.zst` by its numeric version parts."""
    version = path.name[len("CL-ontology-") : -len(".json.zst")]
    return tuple(int(p) for p in re.findall(r"\d+", version))


def newest_ontology_file(data_dir: Path | None = None) -> Path:
    """The newest shipped CL ontology file."""
    data_dir = Path(data_dir) if data_dir is not None else ontology_data_dir()
    files = sorted(data_dir.glob("CL-ontology-*.json.zst"), key=_version_key)
    if not files:
        raise FileNotFoundError(f"no CL-ontology-*.json.zst in {data_dir}")
    return files[-1]


@functools.lru_cache(maxsize=4)
def load_cell_ontology(path: str | Path | None = None) -> CellOntology:
    """Load (and cache) the Cell Ontology from a `CL-ontology-*.json.zst` file; the newest shipped one by default."""
    import zstandard

    path = Path(path) if path is not None else newest_ontology_file()
    with open(path, "rb") as f:
        raw = json.loads(zstandard.ZstdDecompressor().stream_reader(f).read())
    terms = {
        term_id: CLTerm(
            id=term_id,
            name=entry["label"],
            definition=(entry.get("description") or "").strip(),
            synonyms=tuple(entry.get("synonyms") or ()),
            deprecated=bool(entry.get("deprecated")),
            replaced_by=entry.get("replaced_by"),
        )
        for term_id, entry in raw.items()
    }
    version = path.name[len("CL-ontology-") : -len(".json.zst")]
    return CellOntology(terms, version=version)


def cell_type_text(name: str, definition: str = "") -> str:
    """`"cell type: {name}. {definition}"` (the definition omitted when empty)."""
    text = f"cell type: {name}."
    return f"{text} {definition.strip()}" if definition and definition.strip() else text


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
    "cell_type_text",
    "is_missing",
    "load_cell_ontology",
    "newest_ontology_file",
    "ontology_texts",
]
