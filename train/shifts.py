"""Dataset shifts of held-out cells: what another lab's data looks like to a model trained on one dataset.

Each shift turns the test cells' counts into the matrix a user would hand to the jobs (values over their genes, with
their gene names), seeded (`apply_shift(..., seed)`: the same seed gives the same matrix, another seed other draws):

- depth: binomial thinning of every count to a fraction of the reads (50 %, 20 %, 10 %): a shallower run;
- gene panel: a random 70 % / 50 % of the genes kept, the others absent from the matrix (columns dropped, gene names
  shortened): another lab's feature set;
- batch effect: per-gene multiplicative factors f_g with log f_g ~ N(0, σ²) (σ 0.3, 0.6), applied to the counts,
  then stochastically rounded (floor, plus one with probability the fractional part): unbiased integers, unchanged
  where f_g = 1. Plain rounding would leave the 1s and 2s that make up most counts as they are and hide the effect;
  Poisson resampling would add a second round of sampling noise on top of it;
- input convention: raw counts; raw counts of the model's genes only (a file cut to them before it is handed over,
  so normalised over them alone); log1p(CP10k) and log1p(CPM), normalised by each cell's whole library, as
  `scanpy.pp.normalize_total` on a full matrix gives them (log1p(CP10k) is then the values the model trained on);
- combined: 50 % depth, then σ 0.3, then 70 % genes.

Counts. A built dataset stores a log-normalised source as it is: PBMC's `.raw` holds log1p(x / n_counts · 10⁴)
computed over the full gene set and cut to 765 genes afterwards (a cell's expm1 row sum is ~2000, not 10⁴). Counts are
rebuilt as round(expm1(x) · library_size / 10⁴) where the cell's library size is known (`obs["n_counts"]` of PBMC:
the rebuilt values are integers to within 0.001, `counts_from_log1p`); where it is not, the library size that makes
each cell's smallest expressed value one count (`smallest_count_library_sizes`). Stored count rows are counts already.
The library's reads outside the model's genes (~80 % of a PBMC cell's) are handed as one more column, `OTHER_READS`,
as a user's full matrix holds them: the jobs then normalise each cell by its whole library, as in training. Without
it the clean cells would be normalised over the 765 genes alone and every log1p value would shift by ~log(5).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

# name → target sum (None: counts); "model's genes only": a file cut to the model's genes before it is handed over,
# so the jobs normalise over those genes alone
CONVENTIONS = {"raw counts": None, "raw counts, model's genes only": None, "log1p(CP10k)": 1e4, "log1p(CPM)": 1e6}
OTHER_READS = "other genes (reads outside the vocabulary)"  # the column of a cell's reads on genes the model lacks


@dataclass(frozen=True)
class Shift:
    """One shift of the suite: the fraction of reads kept (`depth`), of genes kept (`genes`), the batch effect's
    log-sd (`sigma`) and the input `convention`; `family` and `strength` place it in the table and the plot."""

    name: str
    family: str
    strength: float | str
    depth: float = 1.0
    genes: float = 1.0
    sigma: float = 0.0
    convention: str = "raw counts"


CLEAN = Shift("clean", "clean", 0.0)
FULL_SUITE = (
    CLEAN,
    *(Shift(f"depth {d:.0%}", "depth", d, depth=d) for d in (0.5, 0.2, 0.1)),
    *(Shift(f"genes {g:.0%}", "gene panel", g, genes=g) for g in (0.7, 0.5)),
    *(Shift(f"batch σ {s}", "batch effect", s, sigma=s) for s in (0.3, 0.6)),
    *(Shift(c, "input convention", c, convention=c) for c in list(CONVENTIONS)[1:]),
    Shift("combined", "combined", "50% depth + 70% genes + σ 0.3", depth=0.5, genes=0.7, sigma=0.3),
)
# the demo's: each single shift at the strength of the goals, and the combined one
SHORT_SUITE = tuple(s for s in FULL_SUITE if s.name in ("clean", "depth 50%", "genes 70%", "batch σ 0.3", "combined"))
SUITES = {"short": SHORT_SUITE, "full": FULL_SUITE}


# ---------------------------------------------------------------------------------------------------- counts
def counts_from_log1p(log1p: np.ndarray, library_sizes: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """Counts (cells, genes), integer-valued float64, from log1p(x / library_size · target_sum) values."""
    scale = np.asarray(library_sizes, dtype=np.float64)[:, None] / target_sum
    return np.round(np.expm1(np.asarray(log1p, dtype=np.float64)) * scale)


def smallest_count_library_sizes(log1p: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """(cells,) library sizes for which each cell's smallest expressed value is one count: the fallback where the
    source does not keep them (a normalised cell's smallest value is almost always a single read)."""
    values = np.expm1(np.asarray(log1p, dtype=np.float64))
    smallest = np.where(values > 0, values, np.inf).min(1)
    return np.where(np.isfinite(smallest), target_sum / smallest, target_sum)


def normalized_log1p(counts: np.ndarray, target_sum: float, library_sizes: np.ndarray | None = None) -> np.ndarray:
    """log1p(counts / library size · target_sum), (cells, genes); the library size defaults to the row sums (the
    genes present)."""
    counts = np.asarray(counts, dtype=np.float64)
    sizes = counts.sum(1) if library_sizes is None else np.asarray(library_sizes, dtype=np.float64)
    scale = np.divide(target_sum, sizes, out=np.zeros(len(counts)), where=sizes > 0)
    return np.log1p(counts * scale[:, None])


# ---------------------------------------------------------------------------------------------------- shifts
def thin_depth(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each read kept with probability `fraction`: Binomial(count, fraction) per entry, (cells, genes)."""
    return rng.binomial(np.asarray(counts, dtype=np.int64), fraction).astype(np.float64)


def gene_panel(n_genes: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted column indices of a random `round(fraction · n_genes)` genes."""
    return np.sort(rng.choice(n_genes, size=int(round(fraction * n_genes)), replace=False))


def batch_factors(n_genes: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(genes,) multiplicative factors with log-factor ~ N(0, σ²)."""
    return np.exp(rng.normal(0.0, sigma, size=n_genes))


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """floor(v) + Bernoulli(v - floor(v)): integers with the same expectation as `values`."""
    floor = np.floor(values)
    return floor + (rng.random(values.shape) < values - floor)


def apply_shift(counts: np.ndarray, gene_names: list[str], shift: Shift, other_reads: np.ndarray | None = None,
                seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The matrix a user would hand over under `shift`: ((cells, columns) float32, their gene names).

    `counts` (cells, genes) are the unshifted cells over the model's genes; `other_reads` (cells,) their reads on the
    source's other genes (library size minus the row sum), which a user's full matrix holds: with counts they come as
    one more column, `OTHER_READS`, that no model reads but that counts in each cell's library size when the jobs
    normalise (the shifts treat it as the sum over many genes: thinned with the reads, and by the panel's fraction;
    scaled by the factors' mean, exp(σ²/2)); the normalised conventions divide by the whole library and hand the
    model's genes only. Each shift draws from its own generator, seeded by `seed` and its name."""
    if shift.convention not in CONVENTIONS:
        raise ValueError(f"unknown input convention {shift.convention!r}; known: {list(CONVENTIONS)}")
    rng = np.random.default_rng([seed, zlib.crc32(shift.name.encode())])
    counts, names = np.asarray(counts, dtype=np.float64), list(gene_names)
    other = np.zeros(len(counts)) if other_reads is None else np.asarray(other_reads, dtype=np.float64)
    if shift.depth < 1:
        counts, other = thin_depth(counts, shift.depth, rng), thin_depth(other, shift.depth, rng)
    if shift.sigma > 0:
        counts = stochastic_round(counts * batch_factors(counts.shape[1], shift.sigma, rng), rng)
        other = stochastic_round(other * np.exp(shift.sigma ** 2 / 2), rng)
    if shift.genes < 1:
        kept = gene_panel(counts.shape[1], shift.genes, rng)
        counts, names, other = counts[:, kept], [names[j] for j in kept], thin_depth(other, shift.genes, rng)
    target_sum = CONVENTIONS[shift.convention]
    if target_sum is not None:
        return normalized_log1p(counts, target_sum, counts.sum(1) + other).astype(np.float32), names
    if other_reads is None or shift.convention != "raw counts":
        return counts.astype(np.float32), names
    return np.column_stack([counts, other]).astype(np.float32), [*names, OTHER_READS]


__all__ = ["Shift", "CLEAN", "OTHER_READS", "FULL_SUITE", "SHORT_SUITE", "SUITES", "CONVENTIONS", "apply_shift",
           "thin_depth", "gene_panel", "batch_factors", "stochastic_round", "counts_from_log1p",
           "smallest_count_library_sizes", "normalized_log1p"]
