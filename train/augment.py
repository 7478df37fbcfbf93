"""Seeded augmentation of built cell rows, for zero-shot that holds on other people's data.

Users hand the model cells of another depth, another gene panel, another lab's batch and another value convention
than the training cells. `CellAugmentation` shows the model those differences during training: each collator passes
its rows through it before tokenising them (stages 0, 1, 2 and the classifier; stage 2's target cells stay clean).

Every cell is first brought back to counts over the vocabulary, with its library size:
- count rows are counts already (`total_counts` is the library of the whole file);
- log-normalised rows (`log1p(x / library · 10^4)`) are counts scaled by 10^4 / library, so the smallest expressed
  value is one count: counts = round(expm1(v) / min expm1(v)), library = 10^4 / min expm1(v). On scanpy's PBMC
  `.raw` the quotients are within 0.03 of integers (values are stored to 3 decimals).
Then, each with its own probability and strength drawn per batch:
- depth: binomial thinning of every count (the library thinned alike), to a log-uniform share in `depth_range`;
- batch effect: per-gene log-normal factors (σ uniform up to `batch_sigma_max`, one factor per gene for the whole
  batch, as a lab's protocol would give), counts Poisson-resampled at the scaled means;
- gene panel: one random subset of the vocabulary (a share uniform in `panel_range`) kept for the whole batch, as
  another dataset's gene list would be;
- library basis: the library becomes the sum of the counts left, as when a file holds only those genes and is
  normalised over them (scanpy's PBMC was normalised over all genes, a user's 765-gene file would not be).
The rows come back as count rows; the collators normalise them as they do any count row.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from .shifts import batch_factors, counts_from_log1p, smallest_count_library_sizes, thin_depth
from .sources import COUNTS, LOG_NORMALIZED


@dataclass
class CellAugmentation:
    """Augmentation settings (the `augmentation` section of a training config) and the augmenter itself.

    `enabled` switches it off; `probability` is the share of batches augmented (the rest stay clean); each transform
    then applies with its own probability. `seed` and the batch's cells seed each batch's draws (`batch_seed`): no
    state to lose, so a run resumed from a checkpoint augments the batches it replays exactly as the run it
    continues, whatever the number of DataLoader workers or processes."""

    enabled: bool = True
    probability: float = 0.8
    depth_probability: float = 0.5
    depth_range: list[float] = field(default_factory=lambda: [0.1, 1.0])
    batch_probability: float = 0.5
    batch_sigma_max: float = 0.6
    panel_probability: float = 0.5
    panel_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    library_basis_probability: float = 0.5
    seed: int = 0

    def __post_init__(self):
        for name in ("probability", "depth_probability", "batch_probability", "panel_probability",
                     "library_basis_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augmentation.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("depth_range", "panel_range"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"augmentation.{name} must be [low, high] with 0 < low <= high <= 1, got "
                                 f"{getattr(self, name)}")

    def for_stage(self, name: str) -> "CellAugmentation":
        """A copy with a seed of its own for the stage `name`."""
        return replace(self, seed=zlib.crc32(f"{self.seed}:{name}".encode()))

    def __call__(self, rows: list[dict | None], n_genes: int) -> list[dict | None]:
        """Augmented copies of `rows` (None rows pass through); `n_genes` is the vocabulary's gene count."""
        rng = np.random.default_rng(batch_seed(self.seed, rows, b"augment"))
        if not self.enabled or rng.random() >= self.probability:
            return rows
        plan = self._plan(rng, n_genes)
        return [None if row is None else _augment_row(row, plan, rng) for row in rows]

    def _plan(self, rng: np.random.Generator, n_genes: int) -> dict:
        """One batch's draws: a depth share, per-gene factors, a kept-gene mask, the library basis."""
        plan = {"depth": None, "factors": None, "kept": None,
                "library_of_kept": rng.random() < self.library_basis_probability}
        if rng.random() < self.depth_probability:
            low, high = np.log(self.depth_range)
            plan["depth"] = float(np.exp(rng.uniform(low, high)))
        if rng.random() < self.batch_probability:
            plan["factors"] = batch_factors(n_genes, rng.uniform(0, self.batch_sigma_max), rng)
        if rng.random() < self.panel_probability:
            plan["kept"] = rng.random(n_genes) < rng.uniform(*self.panel_range)
        return plan


def batch_seed(seed: int, rows: list[dict | None], salt: bytes) -> list[int]:
    """A seed for one batch's random draws from `seed` and its cells (their `cell_id`s, else their values): a
    collator that draws from it keeps no state a checkpoint would have to save. `salt` keeps separate uses apart."""
    key = 0
    for row in rows:
        if row is None:
            continue
        cell_id = row.get("cell_id")
        key = zlib.crc32(str(cell_id).encode() if cell_id is not None
                         else np.asarray(row["gene_ids"]).tobytes() + np.asarray(row["expression"]).tobytes(), key)
    return [int(seed), key, zlib.crc32(salt)]


def library_size(row: dict, target_sum: float = 1e4) -> float:
    """A built row's library size: a count row's stored `total_counts` (its reads over all of the source's genes,
    else its row sum); for a log-normalised row, the size at which its smallest expressed value is one read
    (`shifts.smallest_count_library_sizes`: PBMC's rows get their `n_counts` back to within 0.1 %)."""
    values = np.asarray(row["expression"], dtype=np.float64)
    if row.get("value_kind", COUNTS) == COUNTS:
        return float(row.get("total_counts") or values.sum())
    return float(smallest_count_library_sizes(values[None], target_sum)[0])


def row_counts(row: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """(gene ids, counts, library size) of a built row, counts reconstructed for a log-normalised row (see the
    module docstring)."""
    gene_ids = np.asarray(row["gene_ids"], dtype=np.int64)
    values = np.asarray(row["expression"], dtype=np.float64)
    kind = row.get("value_kind", COUNTS)
    if kind == COUNTS:
        return gene_ids, values, library_size(row)
    if kind != LOG_NORMALIZED:
        raise ValueError(f"unknown value_kind {kind!r}; expected {COUNTS!r} or {LOG_NORMALIZED!r}")
    expressed = values > 0
    if not expressed.any():
        return gene_ids[:0], values[:0], 0.0
    library = library_size(row)
    return gene_ids[expressed], counts_from_log1p(values[None, expressed], np.array([library]))[0], library


def _augment_row(row: dict, plan: dict, rng: np.random.Generator) -> dict:
    from .streaming import N_SPECIAL

    gene_ids, counts, library = row_counts(row)
    rest = max(library - counts.sum(), 0.0)  # counts of genes outside the vocabulary
    if plan["factors"] is not None:
        counts = rng.poisson(counts * plan["factors"][gene_ids - N_SPECIAL]).astype(np.float64)
    if plan["depth"] is not None:
        counts = thin_depth(counts, plan["depth"], rng)
        rest = float(rng.binomial(int(round(rest)), plan["depth"]))
    if plan["kept"] is not None:
        keep = plan["kept"][gene_ids - N_SPECIAL]
        gene_ids, counts = gene_ids[keep], counts[keep]
    expressed = counts > 0
    gene_ids, counts = gene_ids[expressed], counts[expressed]
    library = counts.sum() + (0.0 if plan["library_of_kept"] else rest)
    return {**row, "gene_ids": gene_ids, "expression": counts.astype(np.float32), "total_counts": float(library),
            "value_kind": COUNTS}


__all__ = ["CellAugmentation", "batch_seed", "library_size", "row_counts"]
