"""What the jobs return (`jobs_scmmgpt`): a cell type annotation, and generated pseudo-cells (with their AnnData)."""

from dataclasses import dataclass

import numpy as np


@dataclass
class CellAnnotation:
    """`predictions[i]` is the label of cell i (None for a cell with no known gene expressed); `scores` (cells ×
    labels) the method's score of each label (NaN rows for such cells). `label_texts` are the texts the labels were
    scored by and `label_ids` their CL ids where they were resolved through the Cell Ontology (None for the model's
    own labels and free-text ones; both None for a classifier's labels). `subtypes`: label → the model's own labels
    whose texts its score also took the best of (ontology labels coarser than the trained ones), or None."""

    predictions: list
    scores: np.ndarray
    labels: list[str]
    label_texts: list[str] | None = None
    label_ids: list[str | None] | None = None
    subtypes: dict[str, list[str]] | None = None


@dataclass
class GeneratedCells:
    """Pseudo-cells, one row per (text, draw): `expression` (cells × genes) of the kind `output` names —
    `"counts"` (int32 draws from the decoder's count distribution at `library_sizes`), `"log1p"` (those draws as
    log1p(counts / library × `target_sum`)) or `"mean"` (float32 log1p mean of the decoder, the paper's decoding).
    `library_sizes` (cells,): each sampled cell's library size (None for `"mean"`)."""

    expression: np.ndarray
    gene_names: list[str]
    texts: list[str]
    output: str = "mean"
    library_sizes: np.ndarray | None = None
    target_sum: float = 1e4

    @classmethod
    def concatenate(cls, parts: list["GeneratedCells"]) -> "GeneratedCells":
        """One `GeneratedCells` of `parts` (batches of one generation: same genes, kind and target sum) in order."""
        first = parts[0]
        sizes = None if first.library_sizes is None else np.concatenate([p.library_sizes for p in parts])
        return cls(expression=np.concatenate([p.expression for p in parts]), gene_names=first.gene_names,
                   texts=[t for p in parts for t in p.texts], output=first.output, library_sizes=sizes,
                   target_sum=first.target_sum)

    def log1p(self) -> np.ndarray:
        """(cells, genes) float32 log1p-normalised expression: counts normalised by their library, other kinds as
        they are."""
        if self.output != "counts":
            return np.asarray(self.expression, dtype=np.float32)
        scale = self.target_sum / np.asarray(self.library_sizes, dtype=np.float64)
        return np.log1p(self.expression * scale[:, None]).astype(np.float32)

    def to_anndata(self):
        """AnnData of the cells: `.X` the expression as generated (integer counts for `"counts"`, with the log1p
        values in `.layers["log1p"]`), `obs["prompt"]` (and `obs["library_size"]` for sampled cells),
        `uns["scmmgpt"]["output"]` the kind."""
        import anndata  # optional dependency, needed only here
        import pandas as pd

        obs = pd.DataFrame({"prompt": self.texts}, index=[f"pseudo_{i}" for i in range(len(self.texts))])
        if self.library_sizes is not None:
            obs["library_size"] = np.asarray(self.library_sizes, dtype=np.float64)
        counts = self.output == "counts"
        adata = anndata.AnnData(X=self.expression.astype(np.int32 if counts else np.float32), obs=obs,
                                var=pd.DataFrame(index=self.gene_names), uns={"scmmgpt": {"output": self.output}})
        if counts:
            adata.layers["log1p"] = self.log1p()
        return adata


__all__ = ["CellAnnotation", "GeneratedCells"]
