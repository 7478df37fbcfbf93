"""`ScMMGPTCellTokenizer`: cells (AnnData / scipy.sparse / numpy, cells × genes) → gene tokens for the cell encoder.

The algorithm is scGPT's, made deterministic and vectorised over a CSR matrix:
1. map the matrix's genes onto the vocabulary (symbols, or Ensembl IDs through the vocabulary's Ensembl column);
2. optionally normalise each cell to `target_sum` total counts and log1p;
3. encode values: continuous (as they are) or per-cell quantile bins over the cell's non-zero values;
4. keep non-zero genes, the top `max_genes` by expression at float32 (the output's precision), ties broken by gene
   id, never by a random draw; blocks of cells are sorted row-wise on packed integer keys, no per-cell Python;
5. prepend `<cls>`, pad to the longest cell (or `max_genes + 1`).

Chunks of cells are independent, so they are encoded on a thread pool (`num_workers`); the output does not depend on
the number of workers or on the chunking.
"""

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import sparse
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin
from transformers.utils import cached_file

VOCAB_FILE = "gene_vocab.json"
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")


def is_anndata(obj) -> bool:
    """Whether `obj` is an `anndata.AnnData` (views included), tested by name: anndata is an optional import."""
    return type(obj).__name__ == "AnnData" and hasattr(obj, "var_names")


def _strip_ensembl_version(gene: str) -> str:
    return gene.split(".", 1)[0] if gene.startswith("ENS") else gene


class ScMMGPTCellTokenizer(FeatureExtractionMixin):
    r"""
    Turns expression matrices into the cell encoder's inputs.

    Args:
        gene_names: gene symbols in vocabulary order (special tokens are added in front).
        ensembl_ids: optional Ensembl gene IDs parallel to `gene_names`, so matrices indexed by Ensembl IDs map too.
        max_genes: the most gene tokens per cell (the `<cls>` token comes on top).
        normalize: normalise each cell to `target_sum` counts and log1p; set False for data already log-normalised.
        target_sum: total counts per cell after normalisation.
        input_value_mode: `"continuous"` (values as they are) or `"binned"` (per-cell quantile bins).
        n_bins: bins for `"binned"` mode; non-zero values get bins `1..n_bins-1`, bin 0 means not expressed.
        pad_value: value written at padded positions.
        cls_value: value of the `<cls>` token (0; scGPT's own embedding code writes its `pad_value` there, which
            `convert_scgpt` sets so that converted checkpoints give scGPT's cell embeddings).
        num_workers: threads encoding chunks of cells (None: the cores this process may use, at most 8; 1: serial).
            Never changes the output.
        ids_dtype: `"int64"` (as transformers' inputs) or `"int32"` (half the memory; the cell encoder takes both)
            for `gene_ids` and `attention_mask`.

    Calling it returns a `BatchFeature` with
        `gene_ids` (cells × L, `ids_dtype`), `expression_values` (cells × L, float32), `attention_mask` (cells × L,
        `ids_dtype`),
    where position 0 is `<cls>` (value 0) and L = 1 + the most genes kept in any cell (or `max_genes + 1` with
    `padding="max_length"`).
    """

    model_input_names = ["gene_ids", "expression_values", "attention_mask"]

    def __init__(
        self,
        gene_names: list[str] | None = None,
        ensembl_ids: list[str | None] | None = None,
        max_genes: int = 2048,
        normalize: bool = True,
        target_sum: float = 1e4,
        input_value_mode: str = "continuous",
        n_bins: int = 51,
        pad_value: float = -2.0,
        cls_value: float = 0.0,
        num_workers: int | None = None,
        ids_dtype: str = "int64",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if gene_names is None:
            raise ValueError("ScMMGPTCellTokenizer needs `gene_names`, the gene vocabulary (symbols).")
        if input_value_mode not in ("continuous", "binned"):
            raise ValueError(f"input_value_mode must be 'continuous' or 'binned', got {input_value_mode!r}")
        if max_genes < 1:
            raise ValueError(f"max_genes must be >= 1, got {max_genes}")
        gene_names = [str(g) for g in gene_names]
        duplicated = sorted({g for g in gene_names if gene_names.count(g) > 1}) if len(set(gene_names)) < len(gene_names) else []
        if duplicated:
            raise ValueError(f"the gene vocabulary has duplicated genes: {duplicated[:10]}")
        if ensembl_ids is not None and len(ensembl_ids) != len(gene_names):
            raise ValueError(f"ensembl_ids has {len(ensembl_ids)} entries but gene_names has {len(gene_names)}")
        self.gene_names = gene_names
        self.ensembl_ids = list(ensembl_ids) if ensembl_ids is not None else None
        self.max_genes = int(max_genes)
        self.normalize = bool(normalize)
        self.target_sum = float(target_sum)
        self.input_value_mode = input_value_mode
        self.n_bins = int(n_bins)
        self.pad_value = float(pad_value)
        self.cls_value = float(cls_value)
        self.num_workers = None if num_workers is None else _check_num_workers(num_workers)
        self.ids_dtype = _check_ids_dtype(ids_dtype).name
        self._build_index()

    # ----------------------------------------------------------------------------------------------- vocabulary
    def _build_index(self):
        self._columns = None  # (gene names, their mapping) of the last matrix tokenised: see `_map_columns`
        offset = len(SPECIAL_TOKENS)
        self.vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab.update({g: i + offset for i, g in enumerate(self.gene_names)})
        self._upper = {g.upper(): i + offset for i, g in enumerate(self.gene_names)}
        self._ensembl = {}
        for i, ens in enumerate(self.ensembl_ids or []):
            if ens:
                self._ensembl[_strip_ensembl_version(str(ens))] = i + offset

    @property
    def pad_token_id(self) -> int:
        return self.vocab["<pad>"]

    @property
    def cls_token_id(self) -> int:
        return self.vocab["<cls>"]

    def __len__(self) -> int:
        return len(self.vocab)

    def convert_genes_to_ids(self, genes) -> np.ndarray:
        """Vocabulary id of each gene (symbol, case-insensitive fallback, or Ensembl ID); -1 where unknown."""
        ids = np.full(len(genes), -1, dtype=np.int64)
        for j, gene in enumerate(genes):
            gene = str(gene)
            hit = self.vocab.get(gene)
            if hit is None or hit < len(SPECIAL_TOKENS):
                hit = self._ensembl.get(_strip_ensembl_version(gene), self._upper.get(gene.upper()))
            if hit is not None:
                ids[j] = hit
        return ids

    # ----------------------------------------------------------------------------------------------- inputs
    def _matrix_and_genes(self, cells, gene_names, layer, use_raw, gene_column):
        if is_anndata(cells):
            if use_raw and cells.raw is not None:
                matrix, var = cells.raw.X, cells.raw.var
                names = cells.raw.var_names
            else:
                matrix = cells.layers[layer] if layer is not None else cells.X
                var, names = cells.var, cells.var_names
            if gene_names is None:
                gene_names = list(var[gene_column]) if gene_column is not None else list(names)
        else:
            matrix = cells
        if gene_names is None:
            raise ValueError("gene_names is required when cells are a matrix rather than an AnnData")
        if not sparse.issparse(matrix):
            matrix = np.asarray(matrix)
            if matrix.ndim != 2:
                raise ValueError(f"cells must be a 2-D matrix (cells × genes), got an array of shape {matrix.shape}")
        gene_names = [str(g) for g in gene_names]
        if matrix.shape[1] != len(gene_names):
            raise ValueError(
                f"the matrix has {matrix.shape[1]} genes (columns) but {len(gene_names)} gene names were given"
            )
        matrix = sparse.csr_matrix(matrix)  # no copy when already CSR: values are read chunk by chunk, never written
        if not matrix.has_canonical_format:  # duplicate entries of one (cell, gene) add up, as scipy's sum would
            matrix = matrix.copy()
            matrix.sum_duplicates()
        return matrix, gene_names

    def _check_values(self, matrix: sparse.csr_matrix):
        data = matrix.data
        if data.size and not np.isfinite(data).all():
            raise ValueError(f"cells contain {int((~np.isfinite(data)).sum())} NaN or infinite values")
        if data.size and data.min() < 0:
            raise ValueError(
                f"cells contain {int((data < 0).sum())} negative values (min {data.min():.3g}); pass raw counts or "
                "log-normalised expression, not scaled / centred data"
            )

    def _map_columns(self, gene_names):
        """(vocabulary id of each column, mask of known columns); warns about the unknown ones."""
        key = tuple(gene_names)
        if self._columns is None or self._columns[0] != key:
            # a job tokenises the same columns batch after batch: map them once (most of a wide batch's cost)
            self._columns = (key, self._column_ids(gene_names))
        vocab_ids, known, missing = self._columns[1]
        if missing:
            warnings.warn(
                f"{len(missing)} of {len(gene_names)} genes are not in the vocabulary and are ignored "
                f"(e.g. {missing[:5]})",
                stacklevel=3,
            )
        return vocab_ids, known

    def _column_ids(self, gene_names):
        vocab_ids = self.convert_genes_to_ids(gene_names)
        known = vocab_ids >= 0
        if not known.any():
            raise ValueError(
                f"none of the {len(gene_names)} genes is in the vocabulary of {len(self.gene_names)} genes "
                f"(first given: {gene_names[:5]}); check the species and the gene identifiers (symbols or Ensembl IDs)"
            )
        seen, dup = set(), []
        for gene, vid in zip(gene_names, vocab_ids):
            if vid >= 0 and vid in seen:
                dup.append(gene)
            seen.add(vid)
        if dup:
            raise ValueError(f"{len(dup)} genes map to the same vocabulary entry as another column: {dup[:10]}")
        return vocab_ids, known, [g for g, k in zip(gene_names, known) if not k]

    # ----------------------------------------------------------------------------------------------- encoding
    def __call__(
        self,
        cells,
        gene_names: list[str] | None = None,
        *,
        return_tensors: str | None = "np",
        padding: str = "longest",
        max_genes: int | None = None,
        normalize: bool | None = None,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        num_workers: int | None = None,
        ids_dtype=None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Tokenise cells.

        Args:
            cells: `anndata.AnnData`, `scipy.sparse` matrix or numpy array, cells × genes.
            gene_names: gene of each column (symbols or Ensembl IDs); taken from the AnnData when omitted.
            return_tensors: `"np"` or `"pt"`.
            padding: `"longest"` (pad to the longest cell) or `"max_length"` (pad to `max_genes + 1`).
            max_genes: override of the tokenizer's `max_genes` for this call.
            normalize: override of the tokenizer's `normalize` for this call.
            layer, use_raw, gene_column: which AnnData matrix (`layers[layer]`, `raw`) and which `var` column holds
                gene names.
            num_workers, ids_dtype: overrides of the tokenizer's settings for this call.
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        max_genes = self.max_genes if max_genes is None else int(max_genes)
        normalize = self.normalize if normalize is None else normalize
        workers = _check_num_workers(self.num_workers if num_workers is None else num_workers)
        ids_dtype = _check_ids_dtype(self.ids_dtype if ids_dtype is None else ids_dtype)
        matrix, gene_names = self._matrix_and_genes(cells, gene_names, layer, use_raw, gene_column)
        try:
            vocab_ids, _ = self._map_columns(gene_names)
        except ValueError:
            self._check_values(matrix)  # a bad value is named first, before unknown genes
            raise
        scale = None
        if normalize:
            totals = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
            scale = np.divide(self.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        encoding = _Encoding(self, matrix, vocab_ids, scale, max_genes)
        chunks = _row_ranges(matrix.indptr, CHUNK_VALUES, MAX_CHUNK_ROWS)
        scans = _map(encoding.scan, chunks, workers)
        if any(problem for problem, _ in scans):
            self._check_values(matrix)
            raise ValueError(
                f"cells contain values above the float32 range (max {max(p for p, _ in scans if p):.3g}); pass counts "
                "or log-normalised expression"
            )
        kept = np.minimum(encoding.counts, max_genes)
        length = 1 + (max_genes if padding == "max_length" else int(kept.max(initial=0)))
        data = encoding.allocate(length, ids_dtype, kept)
        _map(encoding.write, [(start, stop, fast) for (start, stop), (_, fast) in zip(chunks, scans)], workers)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ----------------------------------------------------------------------------------------------- save / load
    def to_dict(self):
        out = super().to_dict()
        for key in ("gene_names", "ensembl_ids", "vocab", "_upper", "_ensembl", "_columns"):
            out.pop(key, None)
        # transformers' remote-code saver treats any class named "*Tokenizer" as a (slow, fast) text tokenizer pair;
        # a feature extractor's auto_map entry must be a plain "module.Class" string
        auto_map = out.get("auto_map") or {}
        for key, value in auto_map.items():
            if isinstance(value, (list, tuple)):
                auto_map[key] = next(v for v in value if v)
        return out

    def save_vocabulary(self, save_directory) -> str:
        """Writes the gene vocabulary (`gene_vocab.json`), which the JSON config leaves out for its size."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"gene_names": self.gene_names, "ensembl_ids": self.ensembl_ids}, f)
        return path

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Writes `preprocessor_config.json` and the gene vocabulary `gene_vocab.json` beside it."""
        self.save_vocabulary(save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def get_feature_extractor_dict(cls, pretrained_model_name_or_path, **kwargs):
        config, remaining = super().get_feature_extractor_dict(pretrained_model_name_or_path, **kwargs)
        if "gene_names" not in config:
            hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs}
            vocab_path = cached_file(pretrained_model_name_or_path, VOCAB_FILE, **hub_kwargs)
            with open(vocab_path, encoding="utf-8") as f:
                config.update(json.load(f))
        return config, remaining

    @classmethod
    def from_scgpt_vocab(cls, vocab: dict[str, int], **kwargs) -> "ScMMGPTCellTokenizer":
        """A tokenizer from scGPT's `vocab.json` (gene → id); the gene order follows scGPT's ids."""
        genes = [g for g, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if g not in SPECIAL_TOKENS]
        return cls(gene_names=genes, **kwargs)


# --------------------------------------------------------------------------------------------------- encoding core
CHUNK_VALUES = 1 << 21  # stored values per thread-pool task: milliseconds of work, many tasks to balance the cores
MAX_CHUNK_ROWS = 1 << 14
BLOCK_VALUES = 1 << 17  # (cells × longest cell) keys sorted at once: ~1 MB, in the core's cache
MAX_WORKERS = 8
SIGN = 0x7FFFFFFF  # a value field holds SIGN - the float32 bits, so that ascending keys are descending values
FLOAT32_MAX = float(np.finfo(np.float32).max)
UNKNOWN = 0xFFFFFFFF  # gene table entry of a column outside the vocabulary


def default_num_workers() -> int:
    """Threads for the tokenizer: the cores this process may use, at most `MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def _check_num_workers(num_workers) -> int:
    if num_workers is None:
        return default_num_workers()
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer or None (all cores), got {num_workers!r}")
    return int(num_workers)


def _check_ids_dtype(ids_dtype) -> np.dtype:
    dtype = np.dtype(ids_dtype)
    if dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
        raise ValueError(f"ids_dtype must be int64 or int32, got {ids_dtype!r}")
    return dtype


def _row_ranges(indptr, values: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) row ranges covering a CSR matrix's rows, each with about `values` stored values (at
    least one row, at most `max_rows`)."""
    n_rows = len(indptr) - 1
    by_values = np.searchsorted(indptr, np.arange(values, indptr[-1], values), side="right") - 1
    cuts = np.union1d(np.union1d(by_values, np.arange(0, n_rows, max_rows)), [0, n_rows])
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _map(fn, ranges: list[tuple], workers: int) -> list:
    """`fn(*r)` for each range, on a thread pool (numpy releases the GIL in its loops and sorts); in order."""
    if workers == 1 or len(ranges) <= 1:
        return [fn(*r) for r in ranges]
    with ThreadPoolExecutor(max_workers=min(workers, len(ranges))) as pool:
        return list(pool.map(lambda r: fn(*r), ranges))


class _Encoding:
    """One call's encoding of a CSR matrix, in independent row chunks: `scan` checks the values and counts each
    cell's expressed known genes (which fixes the padded length), `write` fills the preallocated outputs.

    Within a chunk, blocks of cells are laid out padded, (cells × longest cell), and each row sorted at once on
    packed uint64 keys: [row | SIGN - float32 value bits (32) | gene id (gene_bits)], so a row's keys ascend as its
    values descend, ties by gene id (the row field is set in binned mode only, where the flat block must be sorted as
    a whole for `np.searchsorted`). Non-expressed, unknown and padding entries get the pad key, which sorts last and
    reads back as gene `<pad>` (and as `pad_value` when that is negative)."""

    def __init__(self, tokenizer, matrix, vocab_ids, scale, max_genes: int):
        self.matrix, self.vocab_ids, self.scale, self.max_genes = matrix, vocab_ids, scale, max_genes
        self.all_known = bool((vocab_ids >= 0).all())
        self.gene_table = np.where(vocab_ids >= 0, vocab_ids, UNKNOWN).astype(np.uint32)  # 4 bytes: cache-friendly
        self.binned, self.n_bins = tokenizer.input_value_mode == "binned", tokenizer.n_bins
        self.pad_id, self.cls_id = tokenizer.pad_token_id, tokenizer.cls_token_id
        self.pad_value, self.cls_value = np.float32(tokenizer.pad_value), np.float32(tokenizer.cls_value)
        self.gene_bits = int(len(tokenizer)).bit_length()  # the all-ones gene field is above every id
        self.gene_mask = np.uint64((1 << self.gene_bits) - 1)
        self.max_block_rows = min(4096, 1 << (32 - self.gene_bits))
        pad_bits = int(self.pad_value.view(np.uint32))
        # a negative pad_value has its sign bit set, so its field SIGN - bits (mod 2^32) is above every value's field
        self.pad_reads_back = pad_bits >= 1 << 31 and not self.binned
        pad_field = (SIGN - pad_bits) % (1 << 32) if self.pad_reads_back else 0xFFFFFFFF
        self.pad_key = np.uint64(pad_field << self.gene_bits | self.pad_id)
        self.counts = np.zeros(matrix.shape[0], dtype=np.int64)

    # ------------------------------------------------------------------------------------------- scan
    def scan(self, start: int, stop: int):
        """Counts the expressed known genes of cells `start:stop` into `self.counts`. Returns (problem, fast):
        problem is True for NaN / infinite / negative values, the largest value where one exceeds float32, else
        None; fast says every stored entry of the chunk is expressed and known."""
        indptr = self.matrix.indptr
        lo, hi = int(indptr[start]), int(indptr[stop])
        stored = np.diff(indptr[start : stop + 1]).astype(np.int64)
        if lo == hi:
            return None, True
        data = self.matrix.data[lo:hi]
        low, high = data.min(), data.max()
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0:
            return True, False
        fast = self.all_known and low > 0 and self._no_underflow(start, stop, stored, low)
        if fast:
            self.counts[start:stop] = stored
            expressed = None
        else:
            expressed = self._expressed(data, lo, hi, np.repeat(np.arange(start, stop), stored))
            total = np.concatenate([[0], np.cumsum(expressed)])
            self.counts[start:stop] = total[indptr[start + 1 : stop + 1] - lo] - total[indptr[start:stop] - lo]
        if self.scale is None and high > FLOAT32_MAX:
            largest = float(data.max() if expressed is None else data[expressed].max(initial=0))
            if largest > FLOAT32_MAX:
                return largest, fast
        return None, fast

    def _no_underflow(self, start, stop, stored, low) -> bool:
        """Whether every stored (positive) value stays positive once normalised: no cell's scale is 0 (an infinite
        total) and the smallest value times the smallest scale is a normal float64."""
        if self.scale is None:
            return True
        scales = self.scale[start:stop][stored > 0]
        return bool(scales.min() > 0 and float(low) * float(scales.min()) >= np.finfo(np.float64).tiny)

    @staticmethod
    def _expression(data, scale):
        """float64 expression of raw values: as they are, or normalised (`scale` per value, float64) and log1p."""
        if scale is None:
            return data.astype(np.float64)
        return np.log1p(np.multiply(data, scale, dtype=np.float64))  # float64(value) * scale, one pass

    def _expressed(self, data, lo, hi, rows):
        """Which stored entries are kept: expressed (> 0 once normalised) and of a known gene."""
        expression = self._expression(data, None if self.scale is None else self.scale[rows])
        return (expression > 0) & (self.vocab_ids[self.matrix.indices[lo:hi]] >= 0)

    # ------------------------------------------------------------------------------------------- write
    def allocate(self, length: int, ids_dtype, kept) -> dict:
        n_cells = self.matrix.shape[0]
        self.length, self.kept = length, kept
        self.gene_ids = np.empty((n_cells, length), dtype=ids_dtype)
        self.values = np.empty((n_cells, length), dtype=np.float32)
        self.mask = np.empty((n_cells, length), dtype=ids_dtype)
        return {"gene_ids": self.gene_ids, "expression_values": self.values, "attention_mask": self.mask}

    def write(self, start: int, stop: int, fast: bool):
        """Writes the outputs' rows `start:stop`, a block of cells at a time."""
        stored = np.diff(self.matrix.indptr[start : stop + 1])
        rows = min(self.max_block_rows, max(1, BLOCK_VALUES // max(1, int(stored.max(initial=0)))))
        for a in range(start, stop, rows):
            self._write_block(a, min(a + rows, stop), fast)

    def _write_block(self, a: int, b: int, fast: bool):
        kept = self.kept[a:b]
        width = int(np.diff(self.matrix.indptr[a : b + 1]).max(initial=0))
        w = min(width, self.length - 1)
        ids, values = self.gene_ids[a:b], self.values[a:b]
        ids[:, 0], values[:, 0] = self.cls_id, self.cls_value
        ids[:, 1 + w :], values[:, 1 + w :] = self.pad_id, self.pad_value
        np.less_equal(np.arange(self.length), kept[:, None], out=self.mask[a:b])
        if w == 0:
            return
        keys = self._sorted_keys(a, b, width, fast)
        top = keys[:, :w]
        np.bitwise_and(top, self.gene_mask, out=ids[:, 1 : 1 + w], casting="unsafe")
        if self.binned:
            values[:, 1 : 1 + w] = self._bins(keys, self.counts[a:b], w)
        else:
            _key_values(top, self.gene_bits, out=values[:, 1 : 1 + w])
        if not self.pad_reads_back:
            np.copyto(values[:, 1 : 1 + w], self.pad_value, where=np.arange(w) >= kept[:, None])

    def _sorted_keys(self, a: int, b: int, width: int, fast: bool) -> np.ndarray:
        """(cells, width) uint64 keys of cells `a:b`, each row ascending: expressed genes by descending value, ties
        by gene id, then pad keys."""
        matrix = self.matrix
        starts = matrix.indptr[a:b].astype(np.int64)
        stored = matrix.indptr[a + 1 : b + 1] - starts
        columns, raw = _padded_rows(matrix.indices, starts, width), _padded_rows(matrix.data, starts, width)
        gene_ids = self.gene_table.take(columns)
        expression = self._expression(raw, None if self.scale is None else self.scale[a:b, None])
        field = np.subtract(np.uint32(SIGN), expression.astype(np.float32).view(np.uint32))
        keys = np.left_shift(field, np.uint64(self.gene_bits))
        keys |= gene_ids
        pad = np.full(b - a, self.pad_key)
        if self.binned:  # rows in the top bits: the flattened block is sorted as a whole
            rows = np.arange(b - a, dtype=np.uint64) << np.uint64(32 + self.gene_bits)
            keys |= rows[:, None]
            pad |= rows
        if fast:  # only the rows' padding tails are missing: a few entries, written by index
            tails = width - stored
            keys.ravel()[_ranges(np.arange(b - a) * width + stored, tails)] = np.repeat(pad, tails)
        else:
            missing = (np.arange(width) >= stored[:, None]) | ~(expression > 0)
            if not self.all_known:
                missing |= gene_ids == UNKNOWN
            np.copyto(keys, pad[:, None], where=missing)
        keys.sort(axis=1)
        return keys

    def _bins(self, keys: np.ndarray, counts: np.ndarray, w: int) -> np.ndarray:
        """Per-cell quantile bins (scGPT: `np.digitize(x, np.quantile(x, linspace(0, 1, n_bins - 1)))` over the cell's
        expressed values) of the first `w` sorted keys of each row, float32, bit for bit what numpy gives cell by cell.

        `keys` (cells, width) as `_sorted_keys` gives them in binned mode, `counts` (cells,) the expressed genes."""
        n_edges, cells, width = self.n_bins - 1, keys.shape[0], keys.shape[1]
        q = np.linspace(0.0, 1.0, n_edges)
        n = np.maximum(counts, 1)[:, None]
        # numpy's linear-method virtual index and neighbours, written as numpy writes them so that rounding matches
        virtual = n.astype(np.float64) * q + (1.0 + q * (1.0 - 1.0 - 1.0)) - 1.0
        below = np.floor(virtual)
        lo = np.clip(below, 0, n - 1).astype(np.int64)
        hi = np.where((virtual < 0) | (virtual >= n - 1), lo, lo + 1)  # out of range: both neighbours clamp
        gamma = virtual - below
        # ascending index i is descending position n - 1 - i
        key_a = np.take_along_axis(keys, n - 1 - lo, axis=1)
        a = _key_values(key_a, self.gene_bits).astype(np.float64)
        b = _key_values(np.take_along_axis(keys, n - 1 - hi, axis=1), self.gene_bits).astype(np.float64)
        diff = b - a
        edges = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp
        # values >= each edge: every value from b up, or, where the edge is a itself, also a's whole run of equal
        # values, whose end is where a's key with the largest gene id would be inserted
        run_end = np.searchsorted(keys.ravel(), (key_a | self.gene_mask).ravel(), side="right").reshape(key_a.shape)
        at_least = np.where(edges <= a, run_end - np.arange(cells)[:, None] * width, n - hi)
        at_least = np.minimum.accumulate(at_least, axis=1)  # edges are ascending, as numpy's digitize needs
        # the value at descending position p is in bin #{edges <= value}: bin n_edges down to the first count, then
        # one less at each count, 0 past the last (padding); run lengths of those bins fill each row's w positions
        bounds = np.concatenate([np.full((cells, 1), w), np.minimum(at_least, w), np.zeros((cells, 1), np.int64)], 1)
        runs = bounds[:, :-1] - bounds[:, 1:]
        bins = np.arange(n_edges + 1, dtype=np.float32)
        return np.repeat(np.broadcast_to(bins, runs.shape)[:, ::-1].ravel(), runs[:, ::-1].ravel()).reshape(cells, w)


def _padded_rows(values: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """(len(starts), width) copy of `values[start : start + width]` for each start; past the end of `values`, rows
    are filled with its last entry."""
    if starts.size and starts[-1] + width <= values.size:  # whole rows of a sliding window: a copy per row
        return sliding_window_view(values, width)[starts]
    return values.take(starts[:, None] + np.arange(width), mode="clip")


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated `arange(start, start + length)` of each (start, length)."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if ends.size else 0) + np.repeat(starts - ends + lengths, lengths)


def _key_values(keys: np.ndarray, gene_bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of packed keys (their 32-bit value field, whatever the row field above it), into `out`."""
    field = np.empty(keys.shape, dtype=np.uint32)
    np.right_shift(keys, np.uint64(gene_bits), out=field, casting="unsafe")
    out = field.view(np.float32) if out is None else out
    np.subtract(np.uint32(SIGN), field, out=out.view(np.uint32))
    return out


__all__ = ["ScMMGPTCellTokenizer", "default_num_workers"]
