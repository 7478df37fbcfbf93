"""`ScMMGPTCellTokenizer`: cells (AnnData / scipy.sparse / numpy, cells × genes) → gene tokens for the cell encoder.

The algorithm is scGPT's, made deterministic and vectorised over a CSR matrix:
1. map the matrix's genes onto the vocabulary (symbols, or Ensembl IDs through the vocabulary's Ensembl column);
2. optionally normalise each cell to `target_sum` total counts and log1p;
3. encode values: continuous (as they are) or per-cell quantile bins over the cell's non-zero values;
4. keep non-zero genes, the top `max_genes` by expression (ties broken by gene id, never by a random draw);
5. prepend `<cls>`, pad to the longest cell (or `max_genes + 1`).
"""

import importlib
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


def _is_anndata(obj) -> bool:
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
        self._build_index()

    # ----------------------------------------------------------------------------------------------- vocabulary
    def _build_index(self):
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
        if _is_anndata(cells):
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
        return sparse.csr_matrix(matrix, dtype=np.float64), gene_names

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
        if not known.all():
            missing = [g for g, k in zip(gene_names, known) if not k]
            warnings.warn(
                f"{len(missing)} of {len(gene_names)} genes are not in the vocabulary and are ignored "
                f"(e.g. {missing[:5]})",
                stacklevel=3,
            )
        return vocab_ids, known

    # ----------------------------------------------------------------------------------------------- encoding
    def _bin_values(self, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Per-cell quantile bins of non-zero values, as scGPT: edges = quantiles at linspace(0, 1, n_bins - 1).

        `values` must be grouped by cell (`rows`) and sorted ascending within each cell. Returns bins 1..n_bins-1.
        """
        _, starts, counts = np.unique(rows, return_index=True, return_counts=True)
        # numpy's default (linear) quantiles, for every cell at once
        pos = (counts[:, None] - 1) * np.linspace(0.0, 1.0, self.n_bins - 1)[None, :]
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, counts[:, None] - 1)
        frac = pos - lo
        edges = values[starts[:, None] + lo] * (1 - frac) + values[starts[:, None] + hi] * frac
        # np.digitize(x, edges) for every value at once: shift each cell into its own band of the real line so that
        # one searchsorted over all cells' (sorted) edges counts the edges <= x within the value's own cell
        band = (values.max() + 1.0) * np.arange(len(counts), dtype=np.float64)
        cell = np.repeat(np.arange(len(counts)), counts)
        flat_edges = (edges + band[:, None]).ravel()
        below = np.searchsorted(flat_edges, values + band[cell], side="right")
        return (below - cell * (self.n_bins - 1)).astype(np.float64)

    def _encode_chunk(self, matrix: sparse.csr_matrix, max_genes: int):
        """(row, gene id, value, rank) of the kept genes of a CSR chunk whose columns are vocabulary ids."""
        coo = matrix.tocoo()
        nonzero = coo.data > 0
        rows, gene_ids, expression = coo.row[nonzero].astype(np.int64), coo.col[nonzero].astype(np.int64), coo.data[nonzero]
        # sort by (cell, expression descending, gene id): the top-k of each cell is then its first k entries
        order = np.lexsort((gene_ids, -expression, rows))
        rows, gene_ids, expression = rows[order], gene_ids[order], expression[order]
        values = expression
        if self.input_value_mode == "binned" and expression.size:
            ascending = np.lexsort((expression, rows))
            values = np.empty_like(expression)
            values[ascending] = self._bin_values(expression[ascending], rows[ascending])
        counts = np.bincount(rows, minlength=matrix.shape[0])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(rows.size) - starts[rows]
        keep = rank < max_genes
        return rows[keep], gene_ids[keep], values[keep], rank[keep]

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
        vocab_ids, known = self._map_columns(gene_names)
        if normalize:
            totals = np.asarray(matrix.sum(axis=1)).ravel()
            scale = np.divide(self.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
            matrix = sparse.diags(scale) @ matrix
            matrix.data = np.log1p(matrix.data)
        # columns → vocabulary ids; unknown genes dropped
        remap = sparse.csr_matrix(
            (np.ones(known.sum()), (np.flatnonzero(known), vocab_ids[known])), shape=(len(gene_names), len(self))
        )
        matrix = (matrix @ remap).tocsr()
        n_cells = matrix.shape[0]
        chunks = [self._encode_chunk(matrix[i : i + ROW_CHUNK], max_genes) for i in range(0, n_cells, ROW_CHUNK)]
        longest = max((int(c[3].max()) + 1 for c in chunks if c[3].size), default=0)
        length = 1 + (max_genes if padding == "max_length" else longest)
        gene_ids = np.full((n_cells, length), self.pad_token_id, dtype=np.int64)
        values = np.full((n_cells, length), self.pad_value, dtype=np.float32)
        mask = np.zeros((n_cells, length), dtype=np.int64)
        gene_ids[:, 0], values[:, 0], mask[:, 0] = self.cls_token_id, 0.0, 1
        for start, (rows, ids, vals, rank) in zip(range(0, n_cells, ROW_CHUNK), chunks):
            gene_ids[start + rows, 1 + rank] = ids
            values[start + rows, 1 + rank] = vals
            mask[start + rows, 1 + rank] = 1
        data = {"gene_ids": gene_ids, "expression_values": values, "attention_mask": mask}
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ----------------------------------------------------------------------------------------------- save / load
    def to_dict(self):
        out = super().to_dict()
        for key in ("gene_names", "ensembl_ids", "vocab", "_upper", "_ensembl"):
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


def optional_import(name: str):
    """Import an optional dependency by name (kept out of the remote-code import scan), or return None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


__all__ = ["ScMMGPTCellTokenizer"]
