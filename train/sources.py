"""Lazy, chunked readers of single-cell files: one `CellSource` per `.h5ad` file or in-memory AnnData.

A source exposes its cells' metadata (obs columns, read whole: O(cells) memory) and its expression matrix in row
chunks (O(chunk) memory), so a file larger than RAM can be read. For `.h5ad` files in the current on-disk format the
matrix is opened with h5py + `anndata.io.sparse_dataset` (anndata's `backed="r"` mode would load `layers` into memory);
files of the pre-0.7 format go through `anndata.read_h5ad(backed="r")`.

Which matrix is read, in order of preference: `layers["counts"]`, `raw.X`, `X` — the first holding integer counts;
failing that, log-normalised values from `raw.X` (else `X`). `value_kind` records which one it is.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import sparse

COUNTS = "counts"
LOG_NORMALIZED = "log1p_normalized"
VALUE_KINDS = ("auto", COUNTS, LOG_NORMALIZED)
SAMPLE_CELLS = 1000  # cells inspected to decide whether a matrix holds counts
MAX_LOG_VALUE = 30.0  # log1p of any per-cell normalisation stays far below this; larger values are not log data
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "gene_names", "symbol")


class DataError(ValueError):
    """A problem with an input file or its contents; the message names the file."""


class OptionError(DataError):
    """A bad value of one build option: `option` (its keyword name, e.g. `label_column`) and `problem`, the words that
    follow its name. The message reads `label_column 'x' is not a column of obs ...`; `scmmgpt build-dataset` puts the
    flag (`--label-column`) in its place."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(f"{option} {problem}")


def _table_name(matrix_name: str) -> str:
    return ".raw.var" if matrix_name == "raw/X" else ".var"


@dataclass
class _VarTable:
    """The gene table of one matrix (`.var` or `.raw.var`): its column names and a reader of one column."""

    columns: list[str]
    read: Callable[[str], object]


@dataclass
class CellSource:
    """One input's cells: metadata up front, the expression matrix in chunks.

    Attributes:
        name: the file path (or `"AnnData[i]"`), used in every error message.
        obs_names: cell ids, shape (n_cells,).
        obs_columns: names of the obs (cell metadata) columns.
        var: the gene-name candidates of the chosen matrix: `{"index": [...], "feature_name": [...], ...}`.
        matrix_name: `"layers/counts"`, `"raw/X"` or `"X"`.
        value_kind: `"counts"` or `"log1p_normalized"`.
    """

    name: str
    obs_names: np.ndarray
    obs_columns: list[str]
    var: dict[str, list[str]] = field(default_factory=dict)
    matrix_name: str = "X"
    value_kind: str = COUNTS
    _read_obs: Callable[[str], np.ndarray] | None = None
    _matrices: dict[str, Callable[[int, int], sparse.csr_matrix]] = field(default_factory=dict)
    _var_of: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    _tables: dict[str, _VarTable] = field(default_factory=dict)
    _close: Callable[[], None] | None = None

    @property
    def n_cells(self) -> int:
        return len(self.obs_names)

    def obs(self, column: str) -> np.ndarray:
        """One obs column as an object array of length n_cells (categoricals as their values)."""
        try:
            return np.asarray(self._read_obs(column), dtype=object)
        except Exception as err:  # noqa: BLE001 - any read failure is a file problem worth naming
            raise DataError(f"{self.name}: cannot read obs column {column!r}: {err}") from err

    @property
    def var_table(self) -> str:
        """The table the chosen matrix's genes are read from: `".var"`, or `".raw.var"` for `raw/X`."""
        return _table_name(self.matrix_name)

    @property
    def var_columns(self) -> list[str]:
        """That table's columns, `"index"` first; any of them can be read with `var_column`."""
        table = self._tables.get(self.matrix_name)
        return ["index"] + ([] if table is None else [c for c in table.columns if c != "index"])

    def var_column(self, column: str) -> list[str]:
        """One column of `var_table` (one of `var_columns`) as strings, one per gene."""
        if column in self.var:
            return self.var[column]
        try:
            return [str(v) for v in self._tables[self.matrix_name].read(column)]
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{self.name}: cannot read {self.var_table} column {column!r}: {err}") from err

    def read_rows(self, start: int, stop: int) -> sparse.csr_matrix:
        """Rows `start:stop` of the chosen matrix as float32 CSR, shape (stop - start, n_genes)."""
        try:
            chunk = self._matrices[self.matrix_name](start, stop)
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{self.name}: cannot read {self.matrix_name} rows {start}:{stop} "
                            f"(corrupt or truncated file?): {err}") from err
        return sparse.csr_matrix(chunk, dtype=np.float32)

    def close(self):
        if self._close is not None:
            self._close()
            self._close = None

    def choose_matrix(self, value_kind: str = "auto"):
        """Pick the matrix to read (see the module docstring) and set `matrix_name`, `value_kind`, `var`."""
        if value_kind not in VALUE_KINDS:
            raise OptionError("value_kind", f"must be one of {VALUE_KINDS}, got {value_kind!r}")
        if not self._matrices:
            raise DataError(f"{self.name}: has no expression matrix (X)")
        found = {name: self._inspect(name) for name in ("layers/counts", "raw/X", "X") if name in self._matrices}
        counts = [n for n, kind in found.items() if kind == COUNTS]
        logs = [n for n, kind in found.items() if kind == LOG_NORMALIZED]
        if value_kind in ("auto", COUNTS) and counts:
            self.matrix_name, self.value_kind = counts[0], COUNTS
        elif value_kind == COUNTS:
            described = ", ".join(f"{n}: {k}" for n, k in found.items())
            raise DataError(f"{self.name}: raw counts are required but no matrix holds integer counts ({described})")
        elif logs:
            self.matrix_name, self.value_kind = logs[0], LOG_NORMALIZED
        else:
            described = ", ".join(f"{n}: {k}" for n, k in found.items())
            raise DataError(
                f"{self.name}: no usable expression matrix ({described}); store raw counts (layers['counts'] or "
                "raw.X) or log1p-normalised values, not scaled / centred data"
            )
        self.var = self._var_of[self.matrix_name]

    def _inspect(self, name: str) -> str:
        """'counts', 'log1p_normalized', or a short reason why the matrix is neither, from its first cells."""
        sample = self._matrices[name](0, min(self.n_cells, SAMPLE_CELLS))
        data = sparse.csr_matrix(sample).data
        if data.size and not np.isfinite(data).all():
            return "has NaN or infinite values"
        if data.size and data.min() < 0:
            return f"has negative values (min {data.min():.3g}), scaled data"
        if np.array_equal(data, np.round(data)):
            return COUNTS
        if data.max() > MAX_LOG_VALUE:
            return f"non-integer values up to {data.max():.3g}, normalised but not log-transformed"
        return LOG_NORMALIZED


# ---------------------------------------------------------------------------------------------------- AnnData
def _anndata_source(adata, name: str, close=None) -> CellSource:
    """A source over an AnnData (in memory, or opened with `backed="r"`)."""
    matrices, var_of, tables = {}, {}, {}

    def add(key, matrix, var):
        matrices[key] = lambda a, b, m=matrix: m[a:b]
        var_of[key] = _gene_candidates(list(var.index), var)
        tables[key] = _VarTable([str(c) for c in var.columns], lambda c, v=var: v[c])

    if "counts" in adata.layers:
        add("layers/counts", adata.layers["counts"], adata.var)
    if adata.raw is not None:
        add("raw/X", adata.raw.X, adata.raw.var)
    if adata.X is not None:
        add("X", adata.X, adata.var)
    return CellSource(
        name=name,
        obs_names=np.asarray(adata.obs_names, dtype=object),
        obs_columns=[str(c) for c in adata.obs.columns],
        _read_obs=lambda c: adata.obs[c].to_numpy(),
        _matrices=matrices,
        _var_of=var_of,
        _tables=tables,
        _close=close,
    )


def _gene_candidates(index: list, var) -> dict[str, list[str]]:
    candidates = {"index": [str(g) for g in index]}
    for column in SYMBOL_COLUMNS:
        if column in var:
            candidates[column] = [str(g) for g in var[column]]
    return candidates


# ---------------------------------------------------------------------------------------------------- h5ad
def _h5_matrix(elem):
    """A row-slicing reader over an on-disk matrix element (sparse group or dense dataset)."""
    import h5py
    from anndata.io import sparse_dataset

    if isinstance(elem, h5py.Dataset):
        if elem.ndim != 2:
            raise DataError(f"matrix {elem.name} has shape {elem.shape}, expected cells × genes")
        return lambda a, b: elem[a:b]
    matrix = sparse_dataset(elem)
    if matrix.format == "csc":
        warnings.warn(f"{elem.file.filename}: {elem.name} is stored CSC; reading rows of it is slow and unbounded "
                      "in memory (convert the file to CSR for large data)", stacklevel=3)
    return lambda a, b: matrix[a:b]


def _h5_dataframe_reader(group):
    from anndata.io import read_elem

    return lambda column: np.asarray(read_elem(group[column]))


def _h5_index(group) -> list[str]:
    from anndata.io import read_elem

    return [str(v) for v in read_elem(group[group.attrs["_index"]])]


def _h5_var(group) -> dict[str, list[str]]:
    from anndata.io import read_elem

    candidates = {"index": _h5_index(group)}
    for column in SYMBOL_COLUMNS:
        if column in group:
            candidates[column] = [str(v) for v in read_elem(group[column])]
    return candidates


def _h5_columns(group) -> list[str]:
    """The column names of an on-disk dataframe (obs / var), in their order."""
    return [str(c) for c in np.atleast_1d(group.attrs.get("column-order", [])) if str(c)]


def _h5_table(group) -> _VarTable:
    from anndata.io import read_elem

    return _VarTable(_h5_columns(group), lambda column: read_elem(group[column]))


def _h5ad_source(path: str) -> CellSource:
    """A source over a current-format `.h5ad` (h5py, nothing but obs metadata and var names read up front)."""
    import h5py

    f = h5py.File(path, "r")
    try:
        if isinstance(f.get("obs"), h5py.Dataset):  # pre-0.7 layout: let anndata translate it
            f.close()
            return _legacy_h5ad_source(path)
        for key in ("obs", "var"):
            if key not in f:
                raise DataError(f"{path}: not an AnnData file (no {key!r} group)")
        obs = f["obs"]
        matrices, var_of = {}, {}
        main_var = _h5_var(f["var"])
        if "layers" in f and "counts" in f["layers"]:
            matrices["layers/counts"], var_of["layers/counts"] = _h5_matrix(f["layers/counts"]), main_var
        if "raw" in f and "X" in f["raw"]:
            matrices["raw/X"], var_of["raw/X"] = _h5_matrix(f["raw/X"]), _h5_var(f["raw/var"])
        if "X" in f:
            matrices["X"], var_of["X"] = _h5_matrix(f["X"]), main_var
        tables = {key: _h5_table(f["raw/var" if key == "raw/X" else "var"]) for key in matrices}
        return CellSource(
            name=path, obs_names=np.asarray(_h5_index(obs), dtype=object), obs_columns=_h5_columns(obs),
            _read_obs=_h5_dataframe_reader(obs), _matrices=matrices, _var_of=var_of, _tables=tables,
            _close=f.close,
        )
    except DataError:
        f.close()
        raise
    except Exception as err:  # noqa: BLE001
        f.close()
        raise DataError(f"{path}: not a readable .h5ad file (corrupt or truncated): {err}") from err


def _legacy_h5ad_source(path: str) -> CellSource:
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on moving old-layout elements
        adata = anndata.read_h5ad(path, backed="r")
    return _anndata_source(adata, path, close=adata.file.close)


def open_source(item, index: int = 0, value_kind: str = "auto") -> CellSource:
    """Open a `.h5ad` path or wrap an AnnData, check it has cells and genes, and choose its matrix.

    Raises:
        DataError: missing, empty or corrupt file; no usable matrix; counts required but absent.
    """
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the file is empty (0 bytes)")
        try:
            source = _h5ad_source(path)
        except OSError as err:
            raise DataError(f"{path}: not a readable .h5ad file (corrupt or truncated): {err}") from err
    elif type(item).__name__ == "AnnData":
        source = _anndata_source(item, f"AnnData[{index}]")
    else:
        raise TypeError(f"inputs must be .h5ad paths or AnnData objects, got {type(item).__name__}")
    try:
        if source.n_cells == 0:
            raise DataError(f"{source.name}: has no cells (0 observations)")
        source.choose_matrix(value_kind)
        if not source.var["index"]:
            raise DataError(f"{source.name}: has no genes (0 variables in {source.matrix_name})")
    except Exception:
        source.close()
        raise
    return source


__all__ = ["COUNTS", "LOG_NORMALIZED", "CellSource", "DataError", "OptionError", "open_source"]
