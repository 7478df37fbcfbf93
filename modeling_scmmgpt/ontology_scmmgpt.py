"""The Cell Ontology (CL), offline: its terms by CL id, name and synonym, their parents, and the cell-type text the
model learned, `"cell type: {name}. {definition}"`.

    cl = load_cell_ontology()
    cl.lookup("NK cell").name                     # 'natural killer cell' (an exact synonym; CL ids and names work too)
    [t.name for t in cl.ancestors("CL:0000623")]  # ['group 1 innate lymphoid cell', ..., 'cell'], nearest first
    cell_type_text(term.name, term.definition)    # the text a label's term is scored by

The ontology ships with this package as `cell_ontology.json.gz` (about 0.2 MB; gzip + JSON, read with the standard
library only), next to this module and in every model folder whose remote-code pipelines use it (`save_pipelines`
copies it: transformers copies a folder's `.py` files into its module cache, never its data, so remote code finds the
file in the model folder, `shipped_ontology_file(model_dir)`). It is a pruned copy of one release of the file
`cellxgene-ontology-guide` ships (`cellxgene_ontology_guide/data/CL-ontology-<version>.json.zst`: per CL id `label`,
`description`, `synonyms` (exact), `deprecated`, `replaced_by`, `ancestors` as CL id → distance built from is_a and
part_of): every term, obsolete ones included, with exactly what `CLTerm` holds (the parents are the distance-1
ancestors), and the release's version. Regenerate it, e.g. after a new release of the guide, with

    pip install 'scmmgpt[ontology]'
    python tools/prune_cell_ontology.py [--source CL-ontology-<version>.json.zst]   # from a repository checkout

(`write_pruned_ontology`; the newest release the installed guide carries by default; the same source gives the same
content). The full, or a newer, ontology is read from the guide's file when asked for by path,
`load_cell_ontology(newest_ontology_file())`; only that needs `cellxgene-ontology-guide` and `zstandard`
(`pip install 'scmmgpt[ontology]'`), imported inside `try:` so that remote-code loading never requires them.

The training layer (`scmmgpt_train.ontology`) builds its dataset label mapping and cell texts on this module (the
shipped file by default, so a run's texts do not change with the installed guide); the jobs resolve `annotate` labels
given as CL names or ids with it (`cell_type_terms`).
"""

from __future__ import annotations

import difflib
import functools
import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

ONTOLOGY_FILE = "cell_ontology.json.gz"  # the pruned CL shipped next to this module and in model folders
ONTOLOGY_PACKAGES = "cellxgene-ontology-guide and zstandard"
INSTALL_HINT = "pip install 'scmmgpt[ontology]' (or: pip install cellxgene-ontology-guide zstandard)"
PRUNED_FORMAT = 1
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


def shipped_ontology_file(model_dir=None) -> Path | None:
    """The pruned Cell Ontology shipped with this code (`cell_ontology.json.gz`): the one next to this module (the
    installed package), else the copy in `model_dir`, the model folder or Hub id whose remote code this module is
    (transformers copies only a folder's `.py` files into its module cache); None when neither has it."""
    here = Path(__file__).with_name(ONTOLOGY_FILE)
    if here.is_file():
        return here
    if not model_dir:
        return None
    if os.path.isdir(model_dir):
        file = Path(model_dir) / ONTOLOGY_FILE
        return file if file.is_file() else None
    from transformers.utils import cached_file

    try:
        file = cached_file(str(model_dir), ONTOLOGY_FILE, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):  # neither a folder nor a Hub id
        return None
    return Path(file) if file else None


def ontology_data_dir() -> Path:
    """The `data/` folder of the installed `cellxgene-ontology-guide` package."""
    spec = importlib.util.find_spec("cellxgene_ontology_guide")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the full Cell Ontology ships with {ONTOLOGY_PACKAGES}, which are not installed: "
                          f"{INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _guide_version(path: Path) -> str:
    """`v2026-03-26` of `CL-ontology-v2026-03-26.json.zst`."""
    return path.name[len("CL-ontology-") : -len(".json.zst")]


def _version_key(path: Path) -> tuple:
    """Sort key of `CL-ontology-v2026-03-26.json.zst` by its numeric version parts."""
    return tuple(int(p) for p in re.findall(r"\d+", _guide_version(path)))


def newest_ontology_file(data_dir: Path | None = None) -> Path:
    """The newest CL ontology file cellxgene-ontology-guide ships (ImportError naming the packages without it)."""
    data_dir = Path(data_dir) if data_dir is not None else ontology_data_dir()
    files = sorted(data_dir.glob("CL-ontology-*.json.zst"), key=_version_key)
    if not files:
        raise FileNotFoundError(f"no CL-ontology-*.json.zst in {data_dir}")
    return files[-1]


def _read_zstd_json(path: Path):
    try:  # inside try: transformers' remote-code import check skips it, so loading a model never needs zstandard
        import zstandard
    except ImportError as error:
        raise ImportError(f"reading the full Cell Ontology ({path.name}) needs {ONTOLOGY_PACKAGES}: "
                          f"{INSTALL_HINT}") from error
    with open(path, "rb") as f:
        return json.loads(zstandard.ZstdDecompressor().stream_reader(f).read())


def _term(term_id: str, entry: dict) -> CLTerm:
    """A term of cellxgene-ontology-guide's file."""
    return CLTerm(
        id=term_id,
        name=entry["label"],
        definition=(entry.get("description") or "").strip(),
        synonyms=tuple(entry.get("synonyms") or ()),
        deprecated=bool(entry.get("deprecated")),
        replaced_by=entry.get("replaced_by"),
        parents=tuple(sorted(a for a, distance in (entry.get("ancestors") or {}).items() if distance == 1)),
    )


def _pruned_entry(term: CLTerm) -> dict:
    """A term as the pruned file keeps it: every `CLTerm` field but the id (its key), defaults left out."""
    entry = {}
    for f in fields(CLTerm):
        value = getattr(term, f.name)
        if f.name != "id" and value != f.default:
            entry[f.name] = list(value) if isinstance(value, tuple) else value
    return entry


def _pruned_term(term_id: str, entry: dict) -> CLTerm:
    """A term of the pruned file."""
    return CLTerm(id=term_id, **{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})


def prune_cell_ontology(source: str | Path | None = None) -> dict:
    """The pruned ontology of a cellxgene-ontology-guide `CL-ontology-*.json.zst` (the newest installed by default):
    `{"format", "version", "source", "terms": {CL id: entry}}`, every term in the source's order (name and synonym
    lookups keep the first term that has them) with exactly what `CLTerm` holds."""
    source = Path(source) if source is not None else newest_ontology_file()
    terms = {term_id: _pruned_entry(_term(term_id, entry)) for term_id, entry in _read_zstd_json(source).items()}
    origin = source.name
    try:
        if source.resolve().parent == ontology_data_dir().resolve():
            from importlib.metadata import version

            origin = f"cellxgene-ontology-guide {version('cellxgene-ontology-guide')}, {source.name}"
    except ImportError:
        pass
    return {"format": PRUNED_FORMAT, "version": _guide_version(source), "source": origin, "terms": terms}


def write_pruned_ontology(target: str | Path, source: str | Path | None = None) -> Path:
    """Write `prune_cell_ontology(source)` to `target` as gzip'd JSON (no timestamp: the same source gives the same
    file). Returns the target."""
    target = Path(target)
    data = json.dumps(prune_cell_ontology(source), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with open(target, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        f.write(data)
    return target


def _read_pruned(path: Path) -> CellOntology:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        pruned = json.load(f)
    if pruned.get("format") != PRUNED_FORMAT:
        raise ValueError(f"{path}: a pruned Cell Ontology of format {pruned.get('format')!r}; this code reads "
                         f"format {PRUNED_FORMAT}")
    terms = {term_id: _pruned_term(term_id, entry) for term_id, entry in pruned["terms"].items()}
    return CellOntology(terms, version=pruned["version"])


@functools.lru_cache(maxsize=4)
def load_cell_ontology(path: str | Path | None = None) -> CellOntology:
    """Load (and cache) the Cell Ontology: by default the pruned copy this package ships (`shipped_ontology_file()`,
    standard library only); else the file at `path`, a pruned `.json.gz` (`write_pruned_ontology`) or a
    cellxgene-ontology-guide `CL-ontology-*.json.zst`, e.g. `newest_ontology_file()`, the newest release the installed
    guide carries (ImportError naming the packages without them)."""
    if path is None:
        path = shipped_ontology_file()
        if path is None:
            raise FileNotFoundError(f"{ONTOLOGY_FILE} is missing from {Path(__file__).parent}: reinstall scmmgpt, or "
                                    f"read cellxgene-ontology-guide's with load_cell_ontology(newest_ontology_file()) "
                                    f"({INSTALL_HINT})")
    path = Path(path)
    if path.name.endswith(".json.zst"):
        terms = {term_id: _term(term_id, entry) for term_id, entry in _read_zstd_json(path).items()}
        return CellOntology(terms, version=_guide_version(path))
    return _read_pruned(path)


def cell_type_terms(labels: list[str], model_labels: list[str] = (), model_dir=None) -> dict[str, CLTerm]:
    """label → its live Cell Ontology term, for `annotate` labels that are not the model's own: CL ids (either
    spelling), term names or exact synonyms, case-insensitive, in the shipped ontology. One-line ValueError naming
    every other label with up to 3 close matches among the ontology's names and `model_labels`. `model_dir`: the model
    folder or Hub id, where remote code finds the shipped file (`shipped_ontology_file`); FileNotFoundError naming the
    file when neither this code nor the folder has it."""
    if not labels:
        return {}
    ontology = _shipped_ontology(labels, model_dir)
    terms = {label: ontology.lookup(label) for label in labels}
    unknown = [_why_unknown(ontology, label, term, model_labels) for label, term in terms.items()
               if term is None or term.deprecated]
    if unknown:
        raise ValueError(f"unknown cell type{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not a label of "
                         "this model, a CL id or a Cell Ontology name or synonym; give free-text labels their texts "
                         "with label_texts (CLI: --label-texts FILE)")
    return terms


def _shipped_ontology(labels, model_dir=None) -> CellOntology:
    """The ontology this code ships, or the copy in the model folder (see `cell_type_terms`)."""
    here = shipped_ontology_file() is not None
    path = None if here else shipped_ontology_file(model_dir)  # None: the default, loaded once for every caller
    if not here and path is None:
        where = f" nor in the model folder {model_dir}" if model_dir else ""
        raise FileNotFoundError(f"{', '.join(map(repr, labels))}: not labels of this model, and reading labels as Cell "
                                f"Ontology names or CL ids needs {ONTOLOGY_FILE}, which is neither next to "
                                f"{Path(__file__).name}{where} (save_pipelines and scmmgpt push put it there)")
    return load_cell_ontology(path)


def trained_subtypes(terms: dict[str, CLTerm], trained_texts: dict[str, str], model_dir=None) -> dict[str, list[str]]:
    """label → the model's own labels that its Cell Ontology term covers, for `annotate`'s coarser labels ("T cell"
    for a model trained on T-cell subtypes): a trained label (`trained_texts`: label → its text, `"cell type: {name}.
    ..."`) whose term is one of `terms` (label → term of the labels asked) or lies under it (is_a, part_of) goes to the
    nearest such label only. Trained labels asked for themselves, and labels that cover none, are left out."""
    if not terms:
        return {}
    ontology = _shipped_ontology(list(terms), model_dir)
    asked = {}
    for label, term in terms.items():
        asked.setdefault(term.id, label)
    covered: dict[str, list[str]] = {}
    for trained, text in trained_texts.items():
        term = None if trained in terms else ontology.lookup(ontology_name(text))
        if term is None:
            continue
        lineage = [term.id, *(t.id for t in ontology.ancestors(term.id))]  # nearest first
        nearest = next((asked[i] for i in lineage if i in asked), None)
        if nearest is not None:
            covered.setdefault(nearest, []).append(trained)
    return covered


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


def ontology_name(text: str) -> str:
    """The cell-type name of a cell text `"cell type: {name}. {definition}"` (the name the LLM learned)."""
    return text.removeprefix("cell type: ").split(". ")[0].rstrip(".")


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
    "ontology_name",
    "prune_cell_ontology",
    "shipped_ontology_file",
    "trained_subtypes",
    "write_pruned_ontology",
]

