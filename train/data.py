"""AnnData / CELLxGENE `.h5ad` → text-paired Hugging Face datasets of single cells.

One row per cell (`CELL_FEATURES`): the cell's expressed genes as vocabulary ids with their values (sparse, never
dense), `value_kind` (`"counts"` or `"log1p_normalized"`: whether the tokenizer must normalise them), `total_counts`
(the cell's library size over all of the file's genes, so that normalisation is unaffected by genes missing from the
vocabulary), metadata (cell type label, CL id and name, donor, dataset) and `text`
(`"cell type: {name}. {CL definition} Tissue: … Disease: … Development stage: …"`, the context sentences where the
source has CELLxGENE's `tissue` / `disease` / `development_stage` columns, or only their `*_ontology_term_id` ones).

Files are read in row chunks (`CellSource`), so memory is bounded by the chunk, not the file. `write_dataset` streams
chunks into parquet shards in a temporary folder beside the output and renames it into place only when complete;
`stream_dataset` (in `streaming.py`) reads the shards lazily for training.

Entry points: `build_dataset` (→ `datasets.Dataset` / `DatasetDict`), `write_dataset` (→ shard folder),
`load_dataset_dir`, `split_dataset`; the `scmmgpt build-dataset` command is `build_cli.build_dataset_main`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from .ontology import CONTEXT_COLUMNS, CellOntology, LabelMapping, cell_text, is_missing, load_cell_ontology
from .sources import COUNTS, LOG_NORMALIZED, CellSource, DataError, OptionError, open_source
from .splits import assign_splits

# obs columns tried, in order, when no label column is given; a CL-id column beats a free-text one
LABEL_COLUMNS = ("cell_type_ontology_term_id", "cell_type", "celltype", "cell_types", "CellType", "cell_label",
                 "bulk_labels", "labels", "label")
DONOR_COLUMNS = ("donor_id", "donor", "individual", "patient", "patient_id", "subject")
DATASET_COLUMNS = ("dataset_id", "dataset")
INFO_FILE = "build_info.json"
TOKENIZER_DIR = "cell_tokenizer"
CHUNK_CELLS = 2048  # cells read per chunk: bounds memory to a chunk's non-zeros
ROW_GROUP_CELLS = 1024  # parquet row group: the unit a streaming reader holds in memory


def cell_features():
    """The `datasets.Features` of a built dataset (one row per cell)."""
    from datasets import Features, Sequence, Value

    return Features({
        "cell_id": Value("string"),
        "dataset_id": Value("string"),
        "donor_id": Value("string"),
        "cell_type": Value("string"),
        "cell_type_ontology_term_id": Value("string"),
        "cell_type_name": Value("string"),
        "text": Value("string"),
        "gene_ids": Sequence(Value("int32")),
        "expression": Sequence(Value("float32")),
        "total_counts": Value("float64"),
        "value_kind": Value("string"),
        "split": Value("string"),
    })


@dataclass
class BuildOptions:
    """How cells become rows.

    Args:
        label_column: obs column of cell-type labels (free text or CL ids); found among `LABEL_COLUMNS` when None.
        label_map: extra label → CL id entries, on top of the PBMC table and the ontology's names / synonyms.
        on_unmapped: `"error"` (raise, listing the labels) or `"label_only"` (keep those cells with text
            `"cell type: {label}."`, an empty CL id, and list them in the build report).
        value_kind: `"auto"`, `"counts"` (raise unless raw counts are found) or `"log1p_normalized"`.
        gene_column: column of gene names matched to the vocabulary, of the gene table of the matrix read (`.var`, or
            `.raw.var` for `raw.X`); by default the index or a symbol column (`feature_name`, ...), whichever matches
            more vocabulary genes.
        donor_column, dataset_column: obs columns of donor / dataset ids; found among the usual names when None.
        chunk_cells: cells read per chunk.
        split_by, test_size, seed, held_out_cell_types, validation_size: see `splits.assign_splits`; `split_by=None`
            puts every cell but the held-out types' and the validation cells in `"train"`.
    """

    label_column: str | None = None
    label_map: dict[str, str] | None = None
    on_unmapped: str = "error"
    value_kind: str = "auto"
    gene_column: str | None = None
    donor_column: str | None = None
    dataset_column: str | None = None
    chunk_cells: int = CHUNK_CELLS
    split_by: str | None = None
    test_size: float = 0.1
    seed: int = 0
    held_out_cell_types: list[str] = field(default_factory=list)
    validation_size: float = 0.0


# ---------------------------------------------------------------------------------------------------- vocabulary
def resolve_cell_tokenizer(tokenizer, sources: list[CellSource] | None = None):
    """A `ScMMGPTCellTokenizer` from a tokenizer, a list of gene names, a saved folder, or (None) the union of the
    sources' genes in order of first appearance."""
    from modeling_scmmgpt.feature_extraction_scmmgpt import ScMMGPTCellTokenizer

    if isinstance(tokenizer, ScMMGPTCellTokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return _saved_cell_tokenizer(os.fspath(tokenizer))
    if tokenizer is not None:
        return ScMMGPTCellTokenizer(gene_names=list(tokenizer))
    genes: dict[str, None] = {}
    for source in sources or []:
        genes.update(dict.fromkeys(source.var["index"]))
    return ScMMGPTCellTokenizer(gene_names=list(genes))


def _saved_cell_tokenizer(folder: str):
    from modeling_scmmgpt.feature_extraction_scmmgpt import ScMMGPTCellTokenizer

    if not os.path.isdir(folder):
        raise OptionError("tokenizer", f"{folder!r} is not a folder (a saved cell tokenizer)")
    try:
        return ScMMGPTCellTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OptionError("tokenizer", f"{folder!r} holds no readable cell tokenizer ({first_line})") from err


def gene_columns_to_vocab(source: CellSource, tokenizer, gene_column: str | None = None) -> np.ndarray:
    """Vocabulary id of each of the source's genes (-1 where unknown), shape (n_genes,).

    Raises:
        DataError: duplicated gene names, two genes mapping to one vocabulary entry, or no gene in the vocabulary.
    """
    if gene_column is not None and gene_column not in source.var and gene_column not in source.var_columns:
        raise OptionError("gene_column", f"{gene_column!r} is not a column of {source.var_table} in {source.name}, "
                                         f"the gene table of the matrix read ({source.matrix_name}); columns of "
                                         f"{source.var_table}: {source.var_columns}")
    columns = {gene_column: source.var_column(gene_column)} if gene_column else source.var
    mapped = {c: tokenizer.convert_genes_to_ids(names) for c, names in columns.items()}
    best = max(columns, key=lambda c: int((mapped[c] >= 0).sum()))
    names, ids = columns[best], mapped[best]
    if len(set(names)) < len(names):
        seen, dup = set(), []
        for g in names:
            (dup.append(g) if g in seen else seen.add(g))
        raise DataError(f"{source.name}: duplicated gene names in {source.matrix_name} ({best}): "
                        f"{sorted(set(dup))[:10]}; make them unique (e.g. anndata's var_names_make_unique)")
    known = ids[ids >= 0]
    if known.size == 0:
        raise DataError(f"{source.name}: none of its {len(names)} genes ({names[:5]}, ...) is in the vocabulary of "
                        f"{len(tokenizer.gene_names)} genes; check species and gene identifiers")
    if np.unique(known).size < known.size:
        raise DataError(f"{source.name}: several genes map to one vocabulary entry (case variants or Ensembl "
                        "versions of one gene)")
    if known.size < len(names):
        warnings.warn(f"{source.name}: {len(names) - known.size} of {len(names)} genes are not in the vocabulary "
                      "and are dropped", stacklevel=2)
    return ids


# ---------------------------------------------------------------------------------------------------- metadata
def _first_present(source: CellSource, wanted: str | None, candidates, what: str) -> str | None:
    if wanted is not None:
        if wanted not in source.obs_columns:
            raise OptionError(f"{what}_column", f"{wanted!r} is not a column of obs in {source.name} (columns: "
                                                f"{source.obs_columns})")
        return wanted
    return next((c for c in candidates if c in source.obs_columns), None)


def _string_column(values) -> np.ndarray:
    return np.array(["" if is_missing(v) else str(v) for v in values], dtype=object)


def context_columns(source: CellSource) -> dict[str, np.ndarray]:
    """The CELLxGENE context of each cell that goes into its text (`ontology.CONTEXT_COLUMNS`: tissue, disease,
    development stage), column → values: the name column where the source has it, else its `<column>_ontology_term_id`
    column (a file in CELLxGENE's submission schema holds the ids alone) with each id read as its term's label."""
    context = {}
    for column in CONTEXT_COLUMNS:
        if column in source.obs_columns:
            context[column] = _string_column(source.obs(column))
        elif f"{column}_ontology_term_id" in source.obs_columns:
            ids = _string_column(source.obs(f"{column}_ontology_term_id"))
            labels = ontology_term_labels(sorted(set(ids) - {""}))
            context[column] = np.array([labels.get(i, i) for i in ids], dtype=object)
    return context


def ontology_term_labels(term_ids: list[str]) -> dict[str, str]:
    """{term id: label} of UBERON / MONDO / HsapDv / ... ids from the ontologies `cellxgene-ontology-guide` ships; ids
    it does not know, or every id without the package (the `[ontology]` extra), are left out: the text then carries
    the id itself, which still tells the cells' contexts apart."""
    if not term_ids:
        return {}
    try:
        from cellxgene_ontology_guide.ontology_parser import OntologyParser

        parser = OntologyParser()
    except Exception:  # not installed, or its ontology files unreadable: ids stay ids
        return {}
    labels = {}
    for term_id in term_ids:
        try:
            labels[term_id] = parser.get_term_label(term_id)
        except Exception:  # not an ontology id (a free-text value), or a term the shipped releases lack
            continue
    return labels


@dataclass
class CellMetadata:
    """Per-cell metadata of one source (arrays of length n_cells) and its label mapping."""

    labels: np.ndarray
    term_ids: np.ndarray
    term_names: np.ndarray
    texts: np.ndarray
    donors: np.ndarray
    datasets: np.ndarray
    mapping: LabelMapping
    label_column: str


def read_metadata(source: CellSource, options: BuildOptions, ontology: CellOntology) -> CellMetadata:
    """Labels → CL terms → texts, donors and datasets of every cell of a source.

    Raises:
        DataError: no usable label column.
        UnmappedLabelsError: labels without a CL term, when `options.on_unmapped == "error"`.
    """
    column = _first_present(source, options.label_column, LABEL_COLUMNS, "label")
    labels = _string_column(source.obs(column)) if column else None
    if labels is None or not any(labels):
        found = f"column {column!r} holds no labels" if column else f"none of {list(LABEL_COLUMNS)} is present"
        raise OptionError("label_column", f"is needed: {source.name} has no usable cell-type label column ({found}; "
                                          f"obs columns: {source.obs_columns})")
    mapping = ontology.map_labels(labels, options.label_map)
    if options.on_unmapped == "error":
        mapping.raise_if_unmapped(f"{source.name} (obs[{column!r}])")
    elif options.on_unmapped != "label_only":
        raise OptionError("on_unmapped", f"must be 'error' or 'label_only', got {options.on_unmapped!r}")
    context = context_columns(source)
    texts, cache = np.empty(len(labels), dtype=object), {}
    for i, label in enumerate(labels):
        key = (label, *(values[i] for values in context.values()))
        if key not in cache:  # few distinct (label, tissue, ...) combinations: build each text once
            cache[key] = cell_text(mapping.terms.get(label), label, {c: v[i] for c, v in context.items()})
        texts[i] = cache[key]
    term_ids = np.array([mapping.terms[x].id if x in mapping.terms else "" for x in labels], dtype=object)
    names = np.array([mapping.terms[x].name if x in mapping.terms else x for x in labels], dtype=object)
    donor = _first_present(source, options.donor_column, DONOR_COLUMNS, "donor")
    dataset = _first_present(source, options.dataset_column, DATASET_COLUMNS, "dataset")
    default_dataset = Path(source.name).stem if os.path.exists(source.name) else source.name
    return CellMetadata(
        labels=labels, term_ids=term_ids, term_names=names, texts=texts,
        donors=_string_column(source.obs(donor)) if donor else np.full(len(labels), "", dtype=object),
        datasets=_string_column(source.obs(dataset)) if dataset else np.full(len(labels), default_dataset, dtype=object),
        mapping=mapping, label_column=column,
    )


# ---------------------------------------------------------------------------------------------------- rows
def _check_chunk(source: CellSource, chunk: sparse.csr_matrix, start: int):
    data = chunk.data
    where = f"{source.name}: {source.matrix_name} rows {start}:{start + chunk.shape[0]}"
    if data.size and not np.isfinite(data).all():
        raise DataError(f"{where} contain NaN or infinite values")
    if data.size and data.min() < 0:
        raise DataError(f"{where} contain negative values (min {data.min():.3g})")
    if source.value_kind == COUNTS and not np.array_equal(data, np.round(data)):
        raise DataError(f"{where} contain non-integer values although the first cells held counts")


def chunk_to_vocab(chunk: sparse.csr_matrix, col_to_vocab: np.ndarray) -> sparse.csr_matrix:
    """Re-index a CSR chunk's columns to vocabulary ids (unknown genes dropped, zeros removed, ids ascending)."""
    chunk = chunk.tocoo()
    ids = col_to_vocab[chunk.col]
    keep = (ids >= 0) & (chunk.data != 0)
    out = sparse.csr_matrix((chunk.data[keep], (chunk.row[keep], ids[keep])),
                            shape=(chunk.shape[0], int(col_to_vocab.max()) + 1), dtype=np.float32)
    out.sort_indices()
    return out


def iter_record_batches(source: CellSource, meta: CellMetadata, col_to_vocab: np.ndarray, splits: np.ndarray,
                        chunk_cells: int = CHUNK_CELLS, progress=None):
    """Yield `pyarrow.RecordBatch`es of `CELL_FEATURES` rows, one per chunk of `chunk_cells` cells."""
    import pyarrow as pa

    schema = cell_features().arrow_schema
    for start in range(0, source.n_cells, chunk_cells):
        stop = min(start + chunk_cells, source.n_cells)
        raw = source.read_rows(start, stop)
        _check_chunk(source, raw, start)
        totals = np.asarray(raw.sum(axis=1), dtype=np.float64).ravel()
        chunk = chunk_to_vocab(raw, col_to_vocab)
        offsets = pa.array(chunk.indptr.astype(np.int32))
        rows = slice(start, stop)
        columns = {
            "cell_id": source.obs_names[rows], "dataset_id": meta.datasets[rows], "donor_id": meta.donors[rows],
            "cell_type": meta.labels[rows], "cell_type_ontology_term_id": meta.term_ids[rows],
            "cell_type_name": meta.term_names[rows], "text": meta.texts[rows],
            "gene_ids": pa.ListArray.from_arrays(offsets, pa.array(chunk.indices.astype(np.int32))),
            "expression": pa.ListArray.from_arrays(offsets, pa.array(chunk.data.astype(np.float32))),
            "total_counts": totals, "value_kind": np.full(stop - start, source.value_kind, dtype=object),
            "split": splits[rows],
        }
        arrays = [c if isinstance(c, pa.Array) else pa.array(c, type=schema.field(n).type) for n, c in columns.items()]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)
        if progress is not None:
            progress.update(stop - start)


# ---------------------------------------------------------------------------------------------------- building
@dataclass
class _Plan:
    """Everything decided before any row is written: sources, their metadata, gene maps and splits."""

    sources: list[CellSource]
    metas: list[CellMetadata]
    col_maps: list[np.ndarray]
    splits: list[np.ndarray]
    tokenizer: object
    info: dict

    def close(self):
        for source in self.sources:
            source.close()

    def record_batches(self, progress: bool = True):
        from tqdm.auto import tqdm

        total = sum(s.n_cells for s in self.sources)
        with tqdm(total=total, unit="cell", desc="building cells", disable=not progress) as bar:
            for source, meta, cols, split in zip(self.sources, self.metas, self.col_maps, self.splits):
                yield from iter_record_batches(source, meta, cols, split, self.info["chunk_cells"], bar)


def _as_list(inputs) -> list:
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def plan_build(inputs, tokenizer=None, options: BuildOptions | None = None, ontology=None) -> _Plan:
    """Open every input and read its metadata; fail on any bad input before a single row is written."""
    options = options or BuildOptions()
    ontology = ontology or load_cell_ontology()
    sources: list[CellSource] = []
    try:
        for i, item in enumerate(_as_list(inputs)):
            sources.append(open_source(item, i, options.value_kind))
        tokenizer = resolve_cell_tokenizer(tokenizer, sources)
        col_maps = [gene_columns_to_vocab(s, tokenizer, options.gene_column) for s in sources]
        metas = [read_metadata(s, options, ontology) for s in sources]
        all_splits = assign_splits(
            cell_ids=np.concatenate([s.obs_names for s in sources]),
            donors=np.concatenate([m.donors for m in metas]), datasets=np.concatenate([m.datasets for m in metas]),
            cell_types=np.concatenate([np.stack([m.labels, m.term_ids, m.term_names], 1) for m in metas]),
            by=options.split_by, test_size=options.test_size, seed=options.seed,
            held_out_cell_types=options.held_out_cell_types, validation_size=options.validation_size,
        )
    except BaseException:
        for source in sources:
            source.close()
        raise
    bounds = np.cumsum([0] + [s.n_cells for s in sources])
    splits = [all_splits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    info = {
        "n_cells": int(bounds[-1]),
        "splits": {name: int((all_splits == name).sum()) for name in sorted(set(all_splits))},
        "sources": [{"name": s.name, "n_cells": s.n_cells, "matrix": s.matrix_name, "value_kind": s.value_kind,
                     "label_column": m.label_column, "labels": m.mapping.to_dict()}
                    for s, m in zip(sources, metas)],
        "value_kinds": sorted({s.value_kind for s in sources}),
        "unmapped_labels": {k: v for m in metas for k, v in m.mapping.unmapped.items()},
        "vocab_size": len(tokenizer),
        "ontology_version": ontology.version,
        "chunk_cells": options.chunk_cells,
        "split_by": options.split_by, "test_size": options.test_size, "seed": options.seed,
        "held_out_cell_types": list(options.held_out_cell_types), "validation_size": options.validation_size,
    }
    return _Plan(sources, metas, col_maps, splits, tokenizer, info)


def build_dataset(inputs, tokenizer=None, *, progress: bool = False, ontology=None, return_tokenizer: bool = False,
                  **options):
    """Build an in-memory dataset of cells (for data that fits in RAM; use `write_dataset` for corpora).

    Args:
        inputs: a `.h5ad` path, an AnnData, or a list of them (concatenated, genes aligned to the vocabulary).
        tokenizer: the model's `ScMMGPTCellTokenizer`, a list of gene names, a saved tokenizer folder, or None (the
            union of the inputs' genes).
        options: `BuildOptions` fields (`label_column=`, `on_unmapped=`, `value_kind=`, `split_by=`, ...).

    Returns:
        `datasets.Dataset` of `cell_features()` rows; a `DatasetDict` keyed by split when `split_by` or
        `held_out_cell_types` is given; `.info.description` holds the build report (JSON). With
        `return_tokenizer=True`, `(dataset, cell_tokenizer)`: the vocabulary the gene ids refer to.
    """
    import pyarrow as pa
    from datasets import Dataset, DatasetDict, DatasetInfo

    plan = plan_build(inputs, tokenizer, BuildOptions(**options), ontology)
    try:
        table = pa.Table.from_batches(list(plan.record_batches(progress)), schema=cell_features().arrow_schema)
    finally:
        plan.close()
    dataset = Dataset(table, info=DatasetInfo(description=json.dumps(plan.info), features=cell_features()))
    if set(plan.info["splits"]) != {"train"}:
        column = np.asarray(table.column("split").to_pylist(), dtype=object)
        dataset = DatasetDict({name: dataset.select(np.flatnonzero(column == name)) for name in plan.info["splits"]})
    return (dataset, plan.tokenizer) if return_tokenizer else dataset


def write_dataset(inputs, out_dir, tokenizer=None, *, cells_per_shard: int = 100_000, overwrite: bool = False,
                  progress: bool = True, ontology=None, **options) -> dict:
    """Build cells straight into parquet shards under `out_dir/<split>/`, with bounded memory.

    The shards, `build_info.json` and the cell tokenizer (`cell_tokenizer/`) are written to a temporary folder beside
    `out_dir` that is renamed to `out_dir` only when everything is written; on any error it is removed, so an
    `out_dir` that exists is always complete.

    Returns:
        the build report (also in `out_dir/build_info.json`).
    """
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    plan = plan_build(inputs, tokenizer, BuildOptions(**options), ontology)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    writers: dict[str, tuple] = {}  # split → (writer, shard index, rows in shard)
    label_texts: dict[str, dict[str, str]] = {}  # split → label → its first cell's text
    try:
        tmp.mkdir(parents=True)
        for batch in plan.record_batches(progress):
            _write_batch(batch, tmp, writers, cells_per_shard, pq)
            _record_label_texts(batch, label_texts)
        for writer, _, _ in writers.values():
            writer.close()
        plan.info["shards"] = {s: sorted(p.name for p in (tmp / s).glob("*.parquet")) for s in writers}
        plan.info["label_texts"] = label_texts
        (tmp / INFO_FILE).write_text(json.dumps(plan.info, indent=1))
        plan.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        _replace_dir(tmp, out_dir)
    except BaseException:
        for writer, _, _ in writers.values():
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        plan.close()
    return plan.info


def _write_batch(batch, root: Path, writers: dict, cells_per_shard: int, pq):
    """Append a record batch to its splits' current shards, starting a new shard when one is full."""
    import pyarrow.compute as pc

    splits = batch.column(batch.schema.get_field_index("split"))
    for name in pc.unique(splits).to_pylist():
        part = batch.filter(pc.equal(splits, name))
        while part.num_rows:
            writer, shard, rows = writers.get(name, (None, -1, cells_per_shard))
            if rows >= cells_per_shard:
                if writer is not None:
                    writer.close()
                (root / name).mkdir(exist_ok=True)
                shard, rows = shard + 1, 0
                writer = pq.ParquetWriter(root / name / f"cells-{shard:05d}.parquet", batch.schema)
            take = part.slice(0, cells_per_shard - rows)
            writer.write_batch(take, row_group_size=ROW_GROUP_CELLS)
            writers[name] = (writer, shard, rows + take.num_rows)
            part = part.slice(take.num_rows)


def _record_label_texts(batch, label_texts: dict):
    """Add each label met for the first time in `batch` to `label_texts[split]`, with its first cell's text: the
    batches come in shard order, so this is what scanning the written shards would find."""
    import pyarrow.compute as pc

    columns = batch.select(["split", "cell_type", "text"])
    for split in pc.unique(columns.column(0)).to_pylist():
        part = columns.filter(pc.equal(columns.column(0), split))
        _add_first_texts(part.column(1), part.column(2), label_texts.setdefault(split, {}))


def _add_first_texts(labels, texts, found: dict):
    """Add to `found` each label of `labels` (an arrow array) not in it yet, with `texts`' entry at its first cell,
    in order of first appearance; only those texts are read."""
    unique, first = np.unique(labels.to_numpy(zero_copy_only=False), return_index=True)
    new = sorted((row, str(label)) for label, row in zip(unique, first) if str(label) not in found)
    found.update(zip((label for _, label in new), texts.take([row for row, _ in new]).to_pylist() if new else []))


def _replace_dir(tmp: Path, out_dir: Path):
    """Move the finished `tmp` into place; an old `out_dir` is moved aside first and removed last."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- loading
def read_build_info(out_dir) -> dict:
    """The build report of a folder written by `write_dataset`."""
    path = Path(out_dir) / INFO_FILE
    if not path.is_file():
        raise DataError(f"{out_dir}: not a built dataset (no {INFO_FILE}; was the build interrupted?)")
    return json.loads(path.read_text())


def shard_files(out_dir, split: str = "train") -> list[str]:
    """The parquet shards of one split of a built folder, in order."""
    info = read_build_info(out_dir)
    if split not in info.get("shards", {}):
        raise DataError(f"{out_dir}: has no split {split!r} (splits: {sorted(info.get('shards', {}))})")
    return [str(Path(out_dir) / split / name) for name in info["shards"][split]]


def split_label_texts(out_dir, split: str = "train") -> dict[str, str]:
    """label → the text of its first cell in one split of a built folder, in shard order (what
    `stage1.label_texts_of` gives for the same cells in memory). `write_dataset` records them in `build_info.json`;
    for a folder built before it did, the label and text columns are read a shard at a time (a corpus is never held
    whole), once per folder build (a run asks for it in several stages)."""
    shard_files(out_dir, split)  # a folder without that split: its DataError, not a cached miss
    recorded = read_build_info(out_dir).get("label_texts", {})
    if split in recorded:
        return dict(recorded[split])
    built = (Path(out_dir) / INFO_FILE).stat().st_mtime_ns  # a rebuilt folder is read again
    return dict(_split_label_texts(str(out_dir), split, built))


@functools.lru_cache(maxsize=16)
def _split_label_texts(out_dir: str, split: str, built: int) -> dict[str, str]:
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    paths = shard_files(out_dir, split)
    texts: dict[str, str] = {}
    for path in tqdm(paths, desc=f"label texts of {split}", unit="shard", disable=len(paths) < 20):
        table = pq.read_table(path, columns=["cell_type", "text"])
        _add_first_texts(table.column("cell_type"), table.column("text"), texts)
    return texts


def load_dataset_dir(out_dir, split: str = "train", cache_dir: str | None = None):
    """One split of a built folder as a memory-mapped `datasets.Dataset` (converted into `cache_dir`, by default the
    `datasets` cache)."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files={split: shard_files(out_dir, split)}, split=split, cache_dir=cache_dir)


def load_cell_tokenizer(out_dir):
    """The cell tokenizer (gene vocabulary) a folder was built with."""
    from modeling_scmmgpt.feature_extraction_scmmgpt import ScMMGPTCellTokenizer

    return ScMMGPTCellTokenizer.from_pretrained(str(Path(out_dir) / TOKENIZER_DIR))


__all__ = [
    "BuildOptions",
    "COUNTS",
    "LOG_NORMALIZED",
    "DataError",
    "build_dataset",
    "cell_features",
    "load_cell_tokenizer",
    "load_dataset_dir",
    "read_build_info",
    "shard_files",
    "write_dataset",
]
