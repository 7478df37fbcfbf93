"""Cell inputs of the jobs: one reader for every form users bring, one decision on which matrix and what its values are.

`read_cells(inputs, ...)` takes an AnnData (in memory or backed), a path to an `.h5ad` (opened backed, so that big
files are read chunk by chunk), a numpy / scipy.sparse matrix with `gene_names`, a `{gene: count}` dict or a list of
them, or the endpoint payload `{"genes": [...], "counts": [[...]], "cell_ids": [...]}`. It returns `CellInputs`: the
matrix, the gene names matched to the model's vocabulary, the cell ids, and the decision on the values:

- the matrix: `layer=NAME` → `layers[NAME]`, `use_raw=True` → `.raw`; by default `.X`, or `.raw` when `.X` holds scaled
  values (negative entries) and `.raw` holds none;
- the values, detected from a sample of rows of any matrix type: raw counts (normalised to 10k per cell + log1p, as
  the training data), normalised but not logged (rescaled + log1p), log1p-normalised (used as they are, unless they
  were normalised to a larger total than 10k, e.g. log1p(CPM): then expm1, rescaled to 10k, log1p), or scaled
  (refused, naming the option that fixes it).

`CellInputs.decision` says all of this in one line; the jobs print it and the CLI records it in `uns`.
"""

import importlib
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from .feature_extraction_scmmgpt import is_anndata

SAMPLE_ROWS = 512  # rows read to detect the kind of values (spread over the matrix, not only its first cells)
LOG1P_MAX = 20.0  # log1p of any plausible normalised value is below this; larger non-integer values are not logged
# log1p values whose cells sum (after expm1) to more than this were normalised to a larger total than the model's 10k
# (log1p(CPM): 10^6): the values would sit log(100) above the training values. 10k-normalised cells sum to at most
# 10k (less when the file keeps only some genes), so 3x leaves room for rounding and stays far below CPM.
LOG1P_TOTAL_MAX = 3e4
VALUE_KINDS = ("counts", "normalized", "log1p", "scaled")
NORMALIZE_CHOICES = ("auto", "yes", "no")
KIND_NAMES = {"counts": "raw counts", "normalized": "normalised counts, not logged", "log1p": "log1p-normalised values",
              "scaled": "scaled values"}


@dataclass
class CellInputs:
    """Cells ready for the jobs: `matrix` (cells × genes; numpy, scipy.sparse or a backed AnnData matrix, read by row
    chunks), `gene_names` (one per column), `cell_ids`, whether the tokenizer normalises (`normalize`), where the
    matrix came from (`source`), the detected `value_kind`, and the one-line `decision`."""

    matrix: object
    gene_names: list[str]
    cell_ids: list[str]
    normalize: bool
    source: str = "matrix"
    value_kind: str = "log1p"
    gene_column: str = "var_names"
    notes: list[str] = field(default_factory=list)
    unlog: bool = False  # expm1 the values before the tokenizer normalises them (log1p values to another total)

    @property
    def n_cells(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def decision(self) -> str:
        source = self.source + (" (.X holds scaled values)" if "X scaled" in self.notes else "")
        use = "normalised to 10k per cell + log1p" if self.normalize else "used as they are"
        if self.unlog:
            use = "normalised to a larger total than 10k: expm1, then " + use
        asked = " as requested" if "forced" in self.notes else ""
        return (f"cells: {self.n_cells} from {source}, genes from {self.gene_column}; values look like "
                f"{KIND_NAMES[self.value_kind]}: {use}{asked}")

    def record(self) -> dict:
        """What an output's `uns` keeps of the decision."""
        return {"source": self.source, "value_kind": self.value_kind, "normalized": bool(self.normalize),
                "unlogged": bool(self.unlog),
                "gene_column": self.gene_column, "decision": self.decision}

    def chunks(self, size: int):
        """Yield (start, CSR chunk of at most `size` cells): a backed matrix is read one chunk at a time."""
        for start in range(0, self.n_cells, size):
            chunk = _as_csr(self.matrix[start : start + size])
            if self.unlog:
                chunk = chunk.copy()
                chunk.data = np.expm1(chunk.data)
            yield start, chunk


def _as_csr(block) -> sparse.csr_matrix:
    if sparse.issparse(block):
        return block.tocsr()
    if hasattr(block, "to_memory"):  # an anndata backed sparse dataset sliced lazily
        return sparse.csr_matrix(block.to_memory())
    return sparse.csr_matrix(np.asarray(block))


# ---------------------------------------------------------------------------------------------------- reading
def read_h5ad(path, backed: bool = True):
    """An `.h5ad` file as an AnnData, backed (`"r"`: the matrix stays on disk) by default; one-line errors."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give an .h5ad file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not path.endswith((".h5ad", ".h5")):
        raise ValueError(f"{path}: expected an AnnData .h5ad file")
    try:
        anndata = importlib.import_module("anndata")
    except ImportError as error:
        raise ImportError(f"reading {path!r} needs the `anndata` package: pip install anndata") from error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return anndata.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # h5py / anndata raise many types for a damaged file
        raise ValueError(f"{path}: not a readable .h5ad file ({type(err).__name__}: {err})") from err


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where} is {value}: values must be finite")
    if value < 0:
        raise ValueError(f"{where} is {value}: values must be non-negative")
    return value


def _matrix_from_gene_dicts(cells: list) -> tuple[sparse.csr_matrix, list[str]]:
    """Cells given as {gene: count} dicts → (cells × genes CSR, gene names in first-seen order)."""
    index: dict[str, int] = {}
    rows, cols, values = [], [], []
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict):
            raise TypeError(f"cell {i} is a {type(cell).__name__}; give every cell as a dict of gene → count")
        if not cell:
            raise ValueError(f"cell {i} has no genes")
        for gene, count in cell.items():
            if not isinstance(gene, str) or not gene:
                raise TypeError(f"cell {i}: gene names must be non-empty strings, got {gene!r}")
            rows.append(i)
            cols.append(index.setdefault(gene, len(index)))
            values.append(_number(count, f"cell {i}, gene {gene!r}"))
    matrix = sparse.csr_matrix((np.asarray(values, np.float32), (rows, cols)), shape=(len(cells), len(index)))
    return matrix, list(index)


def _payload_rows(counts, genes) -> np.ndarray:
    if isinstance(counts, (list, tuple)) and counts and not isinstance(counts[0], (list, tuple, np.ndarray)):
        counts = [counts]  # one cell given as a flat list
    if not isinstance(counts, (list, tuple, np.ndarray)) or len(counts) == 0:
        raise TypeError('"counts" must be a non-empty list of cells, each a list of one count per gene')
    for i, row in enumerate(counts):
        if not isinstance(row, (list, tuple, np.ndarray)):
            raise TypeError(f'"counts"[{i}] must be a list of numbers, got {type(row).__name__}')
        if len(row) != len(genes):
            raise ValueError(f'"counts"[{i}] has {len(row)} values but "genes" has {len(genes)} names')
    matrix = np.asarray(counts)
    if matrix.dtype.kind not in "iuf":  # strings, booleans, None: name the first bad value
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                _number(value, f'"counts"[{i}][{j}] (gene {genes[j]!r})')
        raise TypeError(f'"counts" must hold numbers, got values of type {matrix.dtype}')
    return matrix.astype(np.float32)


def _matrix_from_payload(payload: dict) -> tuple[np.ndarray, list[str], list[str] | None]:
    """`{"genes": [...], "counts": [[...]], "cell_ids": [...]}` → (cells × genes float32, genes, cell ids or None)."""
    genes, cell_ids = payload.get("genes"), payload.get("cell_ids")
    if not isinstance(genes, (list, tuple)) or not genes or not all(isinstance(g, str) and g for g in genes):
        raise TypeError('"genes" must be a non-empty list of gene names (strings)')
    if len(set(genes)) != len(genes):
        raise ValueError(f'"genes" has duplicates: {sorted({g for g in genes if genes.count(g) > 1})[:10]}')
    matrix = _payload_rows(payload.get("counts"), genes)
    if cell_ids is not None:
        if not isinstance(cell_ids, (list, tuple)) or len(cell_ids) != len(matrix):
            raise ValueError(f'"cell_ids" must be a list of {len(matrix)} names, one per row of "counts"')
        cell_ids = [str(c) for c in cell_ids]
    return matrix, list(genes), cell_ids


def _plain_cells(inputs, gene_names):
    """Non-AnnData inputs → (matrix, gene names, cell ids or None)."""
    if isinstance(inputs, dict):
        if "genes" in inputs or "counts" in inputs:
            return _matrix_from_payload(inputs)
        return (*_matrix_from_gene_dicts([inputs]), None)
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(c, dict) for c in inputs):
        return (*_matrix_from_gene_dicts(list(inputs)), None)
    if isinstance(inputs, np.ndarray) or sparse.issparse(inputs):
        if gene_names is None:
            raise ValueError("a matrix input needs gene_names=[...], the gene of each column")
        if inputs.ndim != 2:
            raise ValueError(f"a matrix input must be 2-D (cells × genes), got shape {inputs.shape}")
        gene_names = [str(g) for g in gene_names]
        if inputs.shape[1] != len(gene_names):
            raise ValueError(f"the matrix has {inputs.shape[1]} genes (columns) but {len(gene_names)} gene names were "
                             "given")
        return inputs, gene_names, None
    raise TypeError(
        f"cannot read cells from a {type(inputs).__name__}: give an AnnData, a path to an .h5ad file, a dict of "
        'gene → count, a list of such dicts, {"genes": [...], "counts": [[...]]}, or a matrix with gene_names'
    )


# ---------------------------------------------------------------------------------------------------- values
def _sample_rows(matrix) -> np.ndarray:
    """Up to SAMPLE_ROWS row indices spread evenly over the matrix, ascending (backed datasets need sorted reads)."""
    n = int(matrix.shape[0])
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).astype(np.int64)) if n else np.zeros(0, np.int64)


def _sample(matrix) -> sparse.csr_matrix:
    rows = _sample_rows(matrix)
    return _as_csr(matrix[rows] if len(rows) else matrix[:0])


def _sample_values(matrix) -> np.ndarray:
    return _sample(matrix).data


def log1p_total(matrix) -> float:
    """The median total per cell of log1p-normalised `matrix` once expm1'd (its normalisation target, or less when
    the file keeps only some genes), from a sample of rows."""
    sample = _sample(matrix).astype(np.float64)
    sample.data = np.expm1(sample.data)
    return float(np.median(np.asarray(sample.sum(1)).ravel())) if sample.shape[0] else 0.0


def value_kind(matrix) -> str:
    """`"counts"`, `"normalized"` (not logged), `"log1p"` or `"scaled"`, from a sample of rows of `matrix`."""
    values = np.asarray(_sample_values(matrix), dtype=np.float64)
    values = values[values != 0]
    if not values.size:
        return "log1p"  # nothing expressed in the sample: any choice gives the same (empty) cells
    if not np.isfinite(values).all():
        raise ValueError("the cells contain NaN or infinite values")
    if values.min() < 0:
        return "scaled"
    if np.allclose(values, np.round(values)):
        return "counts"
    return "normalized" if values.max() > LOG1P_MAX else "log1p"


def _scaled_error(source: str, has_raw: bool, layers: list[str]) -> ValueError:
    fixes = []
    if has_raw:
        fixes.append("use_raw=True (--use-raw) for the log-normalised .raw")
    if layers:
        fixes.append(f"layer=NAME (--layer NAME) for a counts or log-normalised layer (layers: {layers})")
    hint = "; ".join(fixes) or "pass raw counts or log-normalised expression instead"
    return ValueError(f"{source} holds scaled / centred values (negative entries), which the model cannot read: {hint}")


# ---------------------------------------------------------------------------------------------------- AnnData
def _anndata_matrix(adata, layer, use_raw):
    """(matrix, var, source, notes, its value kind or None where not yet measured) of the AnnData matrix to read."""
    if layer is not None and use_raw:
        raise ValueError("give layer or use_raw, not both")
    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"layer {layer!r} is not in the AnnData; its layers: {list(adata.layers)}")
        return adata.layers[layer], adata.var, f"layers[{layer!r}]", [], None
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw=True but the AnnData has no .raw")
        return adata.raw.X, adata.raw.var, ".raw", [], None
    if adata.raw is None:
        return adata.X, adata.var, ".X", [], None
    kind = value_kind(adata.X)
    if kind == "scaled":
        raw_kind = value_kind(adata.raw.X)
        if raw_kind != "scaled":
            return adata.raw.X, adata.raw.var, ".raw", ["X scaled"], raw_kind
    return adata.X, adata.var, ".X", [], kind


def _gene_candidates(var) -> dict[str, list[str]]:
    candidates = {"var_names": [str(g) for g in var.index]}
    for column in var.columns:
        if var[column].dtype == object or str(var[column].dtype) in ("category", "string"):
            candidates[column] = [str(g) for g in var[column]]
    return candidates


def match_gene_column(var, tokenizer, gene_column: str | None = None) -> tuple[str, list[str]]:
    """(column, gene names): `gene_column` when given, else `var_names` or the `var` column that matches most of the
    vocabulary (Ensembl IDs in `var_names` with symbols in `feature_name`, as CELLxGENE writes them, work as they
    are)."""
    candidates = _gene_candidates(var)
    if gene_column is not None:
        if gene_column not in candidates:
            raise ValueError(f"gene_column {gene_column!r} is not a text column of var: {sorted(candidates)}")
        return gene_column, candidates[gene_column]
    hits = {name: int((tokenizer.convert_genes_to_ids(genes) >= 0).sum()) for name, genes in candidates.items()}
    best = max(hits, key=hits.get)
    if hits[best] == 0:
        raise ValueError(f"none of the {len(var)} genes (var_names or any var column) is in the model's vocabulary "
                         f"of {len(tokenizer.gene_names)} genes; first genes: {candidates['var_names'][:5]}")
    return best, candidates[best]


def _normalize_flag(kind: str, normalize, source: str, has_raw: bool, layers: list[str]) -> tuple[bool, list[str]]:
    """(whether the tokenizer normalises, notes): as asked, else from the kind of values; scaled values never."""
    if normalize not in (True, "yes", False, "no", None, "auto"):
        raise ValueError(f"normalize must be 'auto', True ('yes') or False ('no'), got {normalize!r}")
    if kind == "scaled":
        raise _scaled_error(source, has_raw, layers)
    if normalize in (None, "auto"):
        return kind in ("counts", "normalized"), []
    return normalize in (True, "yes"), ["forced"]


def read_cells(inputs, tokenizer, gene_names=None, *, layer: str | None = None, use_raw: bool | None = None,
               gene_column: str | None = None, normalize="auto") -> CellInputs:
    """Any accepted cell input → `CellInputs` for `tokenizer` (the model's `ScMMGPTCellTokenizer`).

    `normalize`: `"auto"` (from the detected values), True / `"yes"` (normalise to 10k per cell + log1p), False /
    `"no"` (use the values as they are)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = read_h5ad(inputs)
    kind = None
    if is_anndata(inputs):
        matrix, var, source, notes, kind = _anndata_matrix(inputs, layer, use_raw)
        if gene_names is None:
            column, gene_names = match_gene_column(var, tokenizer, gene_column)
        else:
            column, gene_names = "gene_names", [str(g) for g in gene_names]
        cell_ids = [str(c) for c in inputs.obs_names]
        has_raw, layers = inputs.raw is not None, list(inputs.layers)
    else:
        if layer is not None or use_raw:
            raise ValueError("layer / use_raw apply to AnnData inputs only")
        matrix, gene_names, cell_ids = _plain_cells(inputs, gene_names)
        column, source, notes, has_raw, layers = "gene_names", "matrix", [], False, []
    if int(matrix.shape[0]) == 0:
        raise ValueError("no cells were given")
    if sparse.issparse(matrix) and matrix.format == "csc":
        matrix = matrix.tocsr()  # row chunks of a CSC matrix would each scan every column
    kind = kind or value_kind(matrix)
    flag, forced = _normalize_flag(kind, normalize, source, has_raw, layers)
    unlog = kind == "log1p" and normalize in (None, "auto") and log1p_total(matrix) > LOG1P_TOTAL_MAX
    cell_ids = cell_ids or [f"cell_{i}" for i in range(int(matrix.shape[0]))]
    return CellInputs(matrix, gene_names, cell_ids, flag or unlog, source, kind, column, notes + forced, unlog)


# ---------------------------------------------------------------------------------------------------- job arguments
def check_positive_int(value, name: str) -> int:
    """A job argument that must be a positive integer (a bool is not one), as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_non_negative(value, name: str) -> float:
    """A job argument that must be a finite number >= 0, as a float."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def check_names(values, what: str) -> list[str]:
    """A job argument that must be a non-empty list of distinct, non-empty names (labels, genes), as strings."""
    if isinstance(values, str) or not isinstance(values, (list, tuple, np.ndarray)):
        raise ValueError(f"{what} must be a list of names, got {type(values).__name__} {values!r}")
    names = [str(v) for v in values]
    if not names or not all(n.strip() for n in names):
        raise ValueError(f"{what} must be a non-empty list of non-empty names")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} has duplicates: {sorted({n for n in names if names.count(n) > 1})[:10]}")
    return names


__all__ = ["CellInputs", "read_cells", "read_h5ad", "is_anndata", "match_gene_column", "value_kind", "VALUE_KINDS",
           "NORMALIZE_CHOICES", "check_names", "check_non_negative", "check_positive_int"]
