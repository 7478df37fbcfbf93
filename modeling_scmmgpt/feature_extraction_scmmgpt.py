"""`ScMMGPTCellTokenizer`: cells (AnnData / scipy.sparse / numpy, cells × genes) → gene tokens for the cell encoder.

The algorithm is scGPT's, made deterministic and vectorised over a CSR matrix:
1. map the matrix's genes onto the vocabulary (symbols, or Ensembl IDs through the vocabulary's Ensembl column);
2. optionally normalise each cell to `target_sum` total counts and log1p;
3. encode values: continuous (as they are) or per-cell quantile bins over the cell's non-zero values;
4. keep non-zero genes, the top `max_genes` by expression at float32 (the output's precision), ties broken by gene
   id, never by a random draw; one packed-integer sort per chunk of cells, no per-cell Python;
5. prepend `<cls>`, pad to the longest cell (or `max_genes + 1`).
"""

import json
import os
import warnings

import numpy as np
from scipy import sparse
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin
from transformers.utils import cached_file

VOCAB_FILE = "gene_vocab.json"
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
ROW_CHUNK = 4096  # cells per vectorised chunk: bounds the temporary arrays on big matrices


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

    Calling it returns a `BatchFeature` with
        `gene_ids` (cells × L, int64), `expression_values` (cells × L, float32), `attention_mask` (cells × L, int64),
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
    def _bin_values(self, values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Per-cell quantile bins of non-zero values, as scGPT: `np.digitize(x, np.quantile(x, linspace(0, 1, n_bins - 1)))`.

        `values` (float64) must be grouped by cell (`starts`, `counts` of non-empty cells) and ascending within each cell.
        Returns bins 1..n_bins-1, bit for bit what numpy gives cell by cell, for all cells at once and in O(values).
        """
        q = np.linspace(0.0, 1.0, self.n_bins - 1)
        n = counts[:, None].astype(np.float64)
        # numpy's linear-method virtual index and neighbours, written as numpy writes them so that rounding matches
        virtual = n * q + (1.0 + q * (1.0 - 1.0 - 1.0)) - 1.0
        below = np.floor(virtual)
        lo = np.clip(below, 0, n - 1).astype(np.int64)
        hi = np.where((virtual < 0) | (virtual >= n - 1), lo, lo + 1)  # out of range: both neighbours clamp
        gamma = virtual - below
        a, b = values[starts[:, None] + lo], values[starts[:, None] + hi]
        diff = b - a
        edges = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp
        # np.digitize(x, edges) = #{edges <= x}. Each edge lies in [a, b] of two neighbouring sorted values, so the first
        # value >= the edge is the start of a's run of equal values (edge == a) or b's position; counting those
        # positions with a cumulative sum gives every value's bin exactly, with no search and no float tolerance
        index = np.arange(values.size)
        run_start = np.where(np.r_[True, values[1:] != values[:-1]], index, 0)
        run_start[starts] = starts
        run_start = np.maximum.accumulate(run_start)
        first_at_least = np.where(edges <= a, run_start[starts[:, None] + lo], starts[:, None] + hi).ravel()
        below_or_at = np.cumsum(np.bincount(np.maximum.accumulate(first_at_least), minlength=values.size))[: values.size]
        return below_or_at - (self.n_bins - 1) * np.repeat(np.arange(counts.size), counts)

    def _sort_chunk(self, rows, gene_ids, expression):
        """Sorts a chunk's non-zero entries by (cell, expression descending, gene id) with one radix-friendly integer
        sort: the three keys are packed into one uint64 (expression as its float32 bits, the precision of the output).
        Returns the packed, sorted keys; `_unpack` reads them back."""
        gene_bits = max(int(len(self) - 1).bit_length(), 1)
        bits = expression.astype(np.float32).view(np.uint32).astype(np.uint64)
        key = (rows.astype(np.uint64) << np.uint64(31 + gene_bits)) | ((np.uint64(0x7FFFFFFF) - bits) << np.uint64(gene_bits))
        key |= gene_ids.astype(np.uint64)
        key.sort()
        return key

    def _unpack(self, key):
        """(gene ids, float32 values) of packed keys."""
        gene_bits = max(int(len(self) - 1).bit_length(), 1)
        gene_ids = key & np.uint64((1 << gene_bits) - 1)
        bits = ((key >> np.uint64(gene_bits)) & np.uint64(0x7FFFFFFF)).astype(np.uint32)
        return gene_ids, (np.uint32(0x7FFFFFFF) - bits).view(np.float32)

    def _encode_chunk(self, matrix: sparse.csr_matrix, rows_from: int, rows_to: int, vocab_ids, scale):
        """Sorted packed keys of the non-zero, known genes of cells `rows_from:rows_to`, their values' bins (binned
        mode) and the number of such genes in each cell."""
        lo, hi = matrix.indptr[rows_from], matrix.indptr[rows_to]
        rows = np.repeat(np.arange(rows_to - rows_from), np.diff(matrix.indptr[rows_from : rows_to + 1]))
        expression = matrix.data[lo:hi].astype(np.float64)
        gene_ids = vocab_ids[matrix.indices[lo:hi]]
        if scale is not None:
            expression = np.log1p(expression * scale[rows_from + rows])
        keep = (gene_ids >= 0) & (expression > 0)
        rows, gene_ids, expression = rows[keep], gene_ids[keep], expression[keep]
        if expression.size and expression.max() > np.finfo(np.float32).max:
            raise ValueError(
                f"cells contain values above the float32 range (max {expression.max():.3g}); pass counts or "
                "log-normalised expression"
            )
        per_cell = np.bincount(rows, minlength=rows_to - rows_from)
        key = self._sort_chunk(rows, gene_ids, expression)
        bins = None
        if self.input_value_mode == "binned" and key.size:
            _, values = self._unpack(key[::-1])  # ascending values within each cell (cells in reverse order)
            counts = per_cell[::-1][per_cell[::-1] > 0]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            bins = self._bin_values(values.astype(np.float64), starts, counts)[::-1]
        return key, bins, per_cell

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
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        max_genes = self.max_genes if max_genes is None else int(max_genes)
        normalize = self.normalize if normalize is None else normalize
        matrix, gene_names = self._matrix_and_genes(cells, gene_names, layer, use_raw, gene_column)
        self._check_values(matrix)
        vocab_ids, _ = self._map_columns(gene_names)
        scale = None
        if normalize:
            totals = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
            scale = np.divide(self.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        n_cells = matrix.shape[0]
        # 2**(64 - 31 - gene bits) cells fit the packed sort key
        chunk = min(ROW_CHUNK, 1 << (33 - max(int(len(self) - 1).bit_length(), 1)))
        bounds = [(i, min(i + chunk, n_cells)) for i in range(0, n_cells, chunk)]
        encoded, kept = [], np.zeros(n_cells, dtype=np.int64)
        for start, stop in bounds:
            key, bins, per_cell = self._encode_chunk(matrix, start, stop, vocab_ids, scale)
            kept[start:stop] = np.minimum(per_cell, max_genes)
            encoded.append((key, bins, per_cell))
        length = 1 + (max_genes if padding == "max_length" else int(kept.max(initial=0)))
        gene_ids = np.full((n_cells, length), self.pad_token_id, dtype=np.int64)
        values = np.full((n_cells, length), self.pad_value, dtype=np.float32)
        mask = (np.arange(length)[None, :] <= kept[:, None]).astype(np.int64)
        gene_ids[:, 0], values[:, 0] = self.cls_token_id, self.cls_value
        for (start, stop), (key, bins, per_cell) in zip(bounds, encoded):
            if not key.size:
                continue
            # the top max_genes of each cell are its first entries; they fill positions 1..kept in order
            rank = np.arange(key.size) - np.repeat(np.cumsum(per_cell) - per_cell, per_cell)
            top = rank < max_genes
            ids, expression = self._unpack(key[top])
            slots = mask[start:stop, 1:].astype(bool)
            gene_ids[start:stop, 1:][slots] = ids
            values[start:stop, 1:][slots] = expression if bins is None else bins[top]
        data = {"gene_ids": gene_ids, "expression_values": values, "attention_mask": mask}
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


__all__ = ["ScMMGPTCellTokenizer"]
