"""The Cell Ontology (CL), offline: its terms by CL id, name and synonym, their parents, and the cell-type text the
model learned, `"cell type: {name}. {definition}"`.

    cl = load_cell_ontology()
    cl.lookup("NK cell").name                     # 'natural killer cell' (an exact synonym; CL ids and names work too)
    [t.name for t in cl.ancestors("CL:0000623")]  # ['group 1 innate lymphoid cell', ..., 'cell'], nearest first
    cell_type_text(term.name, term.definition)    # the text a label's term is scored by

The ontology is the one `cellxgene-ontology-guide` ships inside its wheel
(`cellxgene_ontology_guide/data/CL-ontology-<version>.json.zst`): a JSON object keyed by CL id, each term carrying
`label` (the name), `description` (the definition), `synonyms` (exact synonyms), `deprecated`, `replaced_by` for
obsolete terms, and `ancestors` (CL id → distance, built by the guide from is_a and part_of relations; distance 1 are
the term's parents). That package and `zstandard` are optional (`pip install 'scmmgpt[ontology]'`): they are imported
only when the ontology is loaded, inside `try:` so that remote-code loading never requires them.

The training layer (`scmmgpt_train.ontology`) builds its dataset label mapping on this module; the jobs resolve
`annotate` labels given as CL names or ids with it (`cell_type_terms`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

ONTOLOGY_PACKAGES = "cellxgene-ontology-guide and zstandard"
INSTALL_HINT = "pip install 'scmmgpt[ontology]' (or: pip install cellxgene-ontology-guide zstandard)"
_CL_ID = re.compile(r"^CL[:_]\d{7}$", re.IGNORECASE)


@dataclass(frozen=True)
class CLTerm:
    """One Cell Ontology term. `synonyms` are its exact synonyms; `parents` the CL ids of its direct parents (is_a,
    and part_of within CL), which with `CellOntology.ancestors` give coarser names for the same cells."""

    id: str
    name: str
    definition: str
    synonyms: tuple[str, ...] = ()
    deprecated: bool = False
    replaced_by: str | None = None
    parents: tuple[str, ...] = ()


def normalise_name(text) -> str:
    """The form names are compared in: lower case, single spaces, no outer whitespace."""
    return " ".join(str(text).strip().lower().split())


def cl_id(text) -> str | None:
    """`"CL:0000236"` for a CL id written either way (`CL:0000236`, `cl_0000236`), else None."""
    text = str(text).strip()
    return text.upper().replace("_", ":") if _CL_ID.match(text) else None


class CellOntology:
    """The Cell Ontology, indexed by id, name and exact synonym (case-insensitive).

    Args:
        terms: CL id → `CLTerm`; `load_cell_ontology()` builds it from the shipped file.
        version: the ontology release (e.g. `"v2026-03-26"`).
        label_map: label → CL id entries that `lookup` consults before names (a dataset's own labels).
    """

    def __init__(self, terms: dict[str, CLTerm], version: str = "unknown", label_map: dict[str, str] | None = None):
        self.terms = terms
        self.version = version
        self.label_map = {normalise_name(k): v for k, v in (label_map or {}).items()}
        self._by_name: dict[str, str] = {}
        self._by_synonym: dict[str, str] = {}
        for term in terms.values():
            if term.deprecated:  # obsolete terms resolve by id only, never by a name match
                continue
            self._by_name.setdefault(normalise_name(term.name), term.id)
            for synonym in term.synonyms:
                self._by_synonym.setdefault(normalise_name(synonym), term.id)

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
        """The term for a free-text label (`label_map` and the built-in map, CL id, name, exact synonym;
        case-insensitive), or None."""
        key = normalise_name(label)
        explicit = {**self.label_map, **{normalise_name(k): v for k, v in (label_map or {}).items()}}
        if key in explicit:
            return self.term(explicit[key])
        term_id = cl_id(label)
        if term_id is not None:
            return self.term(term_id) if term_id in self.terms else None
        term_id = self._by_name.get(key) or self._by_synonym.get(key)
        return self.terms[term_id] if term_id else None

    def ancestors(self, term_id: str) -> list[CLTerm]:
        """Every ancestor of a term through `parents`, nearest first, terms at the same distance in CL id order. (The
        shipped file also counts ancestors reached through non-CL terms; only a few cytoplasm classes have those.)"""
        seen, level, ancestors = set(), [self.term(term_id).id], []
        while level:
            parents = sorted({p for t in level for p in self.terms[t].parents if p in self.terms} - seen)
            seen.update(parents)
            ancestors += [self.terms[p] for p in parents]
            level = parents
        return ancestors

    def close_names(self, label: str, n: int = 3, extra: tuple[str, ...] = ()) -> list[str]:
        """Up to `n` live term names (and `extra` names, e.g. a model's own labels) closest to `label` (difflib,
        case-insensitive): the suggestions of an unknown-label error."""
        names = {normalise_name(name): name for name in (*extra, *(self.terms[i].name for i in self._by_name.values()))}
        return [names[key] for key in difflib.get_close_matches(normalise_name(label), list(names), n=n)]

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
        raise ImportError(f"the Cell Ontology ships with {ONTOLOGY_PACKAGES}, which are not installed: {INSTALL_HINT}")
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


def _read_zstd_json(path: Path):
    try:  # inside try: transformers' remote-code import check skips it, so loading a model never needs zstandard
        import zstandard
    except ImportError as error:
        raise ImportError(f"reading the Cell Ontology needs {ONTOLOGY_PACKAGES}: {INSTALL_HINT}") from error
    with open(path, "rb") as f:
        return json.loads(zstandard.ZstdDecompressor().stream_reader(f).read())


def _term(term_id: str, entry: dict) -> CLTerm:
    return CLTerm(
        id=term_id,
        name=entry["label"],
        definition=(entry.get("description") or "").strip(),
        synonyms=tuple(entry.get("synonyms") or ()),
        deprecated=bool(entry.get("deprecated")),
        replaced_by=entry.get("replaced_by"),
        parents=tuple(sorted(a for a, distance in (entry.get("ancestors") or {}).items() if distance == 1)),
    )


@functools.lru_cache(maxsize=4)
def load_cell_ontology(path: str | Path | None = None) -> CellOntology:
    """Load (and cache) the Cell Ontology from a `CL-ontology-*.json.zst` file; the newest shipped one by default.
    ImportError naming the packages when they are not installed."""
    path = Path(path) if path is not None else newest_ontology_file()
    terms = {term_id: _term(term_id, entry) for term_id, entry in _read_zstd_json(path).items()}
    return CellOntology(terms, version=path.name[len("CL-ontology-") : -len(".json.zst")])


def cell_type_terms(labels: list[str], model_labels: list[str] = ()) -> dict[str, CLTerm]:
    """label → its live Cell Ontology term, for `annotate` labels that are not the model's own: CL ids (either
    spelling), term names or exact synonyms, case-insensitive. One-line ValueError naming every other label with up to
    3 close matches among the ontology's names and `model_labels`; ImportError naming the packages when the ontology
    is not installed."""
    if not labels:
        return {}
    try:
        ontology = load_cell_ontology()
    except ImportError as error:
        raise ImportError(f"{', '.join(map(repr, labels))}: not labels of this model, and reading labels as Cell "
                          f"Ontology names or CL ids needs {ONTOLOGY_PACKAGES}: {INSTALL_HINT}") from error
    terms = {label: ontology.lookup(label) for label in labels}
    unknown = [_why_unknown(ontology, label, term, model_labels) for label, term in terms.items()
               if term is None or term.deprecated]
    if unknown:
        raise ValueError(f"unknown cell type{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not a label of "
                         "this model, a CL id or a Cell Ontology name or synonym; give free-text labels their texts "
                         "with label_texts (CLI: --label-texts FILE)")
    return terms


def _why_unknown(ontology: CellOntology, label: str, term: CLTerm | None, model_labels) -> str:
    if term is not None:  # an obsolete id with no live replacement
        return f"{label!r} (an obsolete term: {term.name})"
    if cl_id(label):
        return f"{label!r} (no such id in the Cell Ontology {ontology.version})"
    close = ontology.close_names(label, extra=tuple(model_labels))
    return f"{label!r} ({'close matches: ' + ', '.join(map(repr, close)) if close else 'no close match'})"


def cell_type_text(name: str, definition: str = "") -> str:
    """`"cell type: {name}. {definition}"` (the definition omitted when empty): the text format the model learned."""
    text = f"cell type: {name}."
    return f"{text} {definition.strip()}" if definition and definition.strip() else text


__all__ = [
    "CLTerm",
    "CellOntology",
    "cell_type_terms",
    "cell_type_text",
    "cl_id",
    "load_cell_ontology",
    "newest_ontology_file",
    "normalise_name",
    "ontology_data_dir",
]
