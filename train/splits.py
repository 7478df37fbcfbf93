"""Train / validation / test / held-out-cell-type splits of cells, reproducible from a seed.

Splits are decided from metadata alone, before any expression is read, so `write_dataset` can write each split's
shards directly and an in-memory dataset can be split the same way (`split_dataset`).
"""

from __future__ import annotations

import numpy as np

from .sources import OptionError

SPLIT_BY = (None, "cell", "donor", "dataset", "auto")


def _held_out_mask(cell_types: np.ndarray, held_out: list[str]) -> np.ndarray:
    """Cells whose label, CL id or CL name (any column of `cell_types`, shape (n, k)) is in `held_out`."""
    if not held_out:
        return np.zeros(len(cell_types), dtype=bool)
    wanted = {str(h).strip().lower() for h in held_out}
    lowered = np.vectorize(lambda v: str(v).strip().lower(), otypes=[object])(cell_types.reshape(len(cell_types), -1))
    mask = np.isin(lowered, list(wanted)).any(axis=1)
    unmatched = sorted(w for w in wanted if not np.isin(lowered, [w]).any())
    if unmatched:
        raise OptionError("held_out_cell_types", f"{unmatched} match no cell (by label, CL id or CL name)")
    return mask


def _group_test_mask(groups: np.ndarray, candidates: np.ndarray, test_size: float, rng, what: str) -> np.ndarray:
    """Whole groups (donors / datasets) go to test, in a seeded order, until `test_size` of the cells is reached."""
    names = groups[candidates]
    if (names == "").any():
        raise OptionError("split_by", f"{what!r} cannot split these cells: {int((names == '').sum())} cells have no "
                          f"{what} id")
    unique, counts = np.unique(names.astype(str), return_counts=True)
    if len(unique) < 2:
        raise OptionError("split_by", f"{what!r} cannot split these cells: they come from {len(unique)} {what}(s); "
                          "need at least 2")
    order = rng.permutation(len(unique))
    target, taken, test_groups = test_size * candidates.sum(), 0, []
    for g in order[:-1]:  # the last group always stays in train
        if taken >= target:
            break
        test_groups.append(unique[g])
        taken += counts[g]
    return candidates & np.isin(groups.astype(str), test_groups)


def check_test_size(test_size: float):
    """Raise `OptionError("test_size", ...)` unless `test_size` is a fraction strictly between 0 and 1."""
    if not 0.0 < test_size < 1.0:
        raise OptionError("test_size", f"must be in (0, 1), got {test_size}")


def check_validation_size(validation_size: float):
    """Raise `OptionError("validation_size", ...)` unless it is 0, a fraction in (0, 1), or a whole number of cells."""
    if validation_size < 0 or (validation_size >= 1 and validation_size != int(validation_size)):
        raise OptionError("validation_size", f"must be a share of the training cells in [0, 1) or a whole number of "
                                             f"cells, got {validation_size}")


def _validation_mask(train: np.ndarray, labels: np.ndarray, validation_size: float, seed: int) -> np.ndarray:
    """`validation_size` of the `train` cells (a share, or a number of cells), each cell type in its share of them
    (largest remainders) but never its last training cell, so the cells a checkpoint is chosen on hold every type
    that can spare one; drawn from their own seeded stream, so that asking for them leaves the test split as it was."""
    candidates = np.flatnonzero(train)
    n = int(validation_size) if validation_size >= 1 else int(round(validation_size * len(candidates)))
    if n >= len(candidates):
        raise OptionError("validation_size", f"asks for {n} validation cells, but only {len(candidates)} training "
                                             "cells are left")
    groups = [candidates[labels[candidates] == label] for label in np.unique(labels[candidates])]
    quotas = np.array([n * len(cells) / len(candidates) for cells in groups])
    take = np.floor(quotas).astype(int)
    take[np.argsort(take - quotas, kind="stable")[: n - take.sum()]] += 1
    rng, mask = np.random.default_rng([seed, 1]), np.zeros(len(train), dtype=bool)
    for cells, k in zip(groups, np.minimum(take, [len(cells) - 1 for cells in groups])):
        mask[rng.choice(cells, size=k, replace=False)] = True
    return mask


def assign_splits(cell_ids, donors, datasets, cell_types, by: str | None = None, test_size: float = 0.1,
                  seed: int = 0, held_out_cell_types=(), validation_size: float = 0.0) -> np.ndarray:
    """The split of every cell: `"train"`, `"validation"`, `"test"` or `"heldout"`.

    Args:
        cell_ids, donors, datasets: arrays of length n ("" where a donor / dataset is unknown).
        cell_types: (n, k) array of each cell's label, CL id, CL name, matched against `held_out_cell_types`.
        by: `None` (everything in train), `"cell"`, `"donor"`, `"dataset"`, or `"auto"` (donor if at least two donors
            are known, else dataset if at least two, else cell).
        test_size: fraction of the non-held-out cells put in test (whole groups when splitting by donor / dataset).
        seed: the same seed and metadata give the same splits.
        held_out_cell_types: labels / CL ids / CL names whose cells all go to `"heldout"` (zero-shot evaluation).
        validation_size: training cells set aside as `"validation"` (the cells on which training chooses its
            checkpoint): a share of them in (0, 1), or a number of cells; single cells, each type in its share
            (`cell_types`' first column), drawn after the test split.

    Returns:
        object array of length n.
    """
    if by not in SPLIT_BY:
        raise OptionError("split_by", f"must be one of {SPLIT_BY}, got {by!r}")
    if by is not None:
        check_test_size(test_size)
    check_validation_size(validation_size)
    donors, datasets = np.asarray(donors, dtype=object), np.asarray(datasets, dtype=object)
    out = np.full(len(cell_ids), "train", dtype=object)
    held = _held_out_mask(np.asarray(cell_types, dtype=object), list(held_out_cell_types))
    out[held] = "heldout"
    if by is not None:
        _assign_test(out, donors, datasets, held, by, test_size, seed)
    if validation_size:
        labels = np.asarray(cell_types, dtype=object).reshape(len(out), -1)[:, 0].astype(str)
        out[_validation_mask(out == "train", labels, validation_size, seed)] = "validation"
    return out


def _assign_test(out: np.ndarray, donors, datasets, held: np.ndarray, by: str, test_size: float, seed: int):
    """Mark the test cells in `out` (see `assign_splits`)."""
    if by == "auto":
        by = next((name for name, g in (("donor", donors), ("dataset", datasets))
                   if len(set(g[g != ""])) >= 2), "cell")
    rng = np.random.default_rng(seed)
    if by == "cell":
        candidates = np.flatnonzero(~held)
        test = candidates[rng.permutation(len(candidates))[: int(round(test_size * len(candidates)))]]
        out[test] = "test"
    else:
        out[_group_test_mask(donors if by == "donor" else datasets, ~held, test_size, rng, by)] = "test"


def split_dataset(dataset, by: str = "auto", test_size: float = 0.1, seed: int = 0, held_out_cell_types=(),
                  validation_size: float = 0.0):
    """Split a built `datasets.Dataset` (`data.cell_features()` rows) into a `DatasetDict` of train / validation /
    test / heldout, exactly as `write_dataset(split_by=...)` would."""
    from datasets import DatasetDict

    columns = dataset.select_columns(["cell_id", "donor_id", "dataset_id", "cell_type",
                                      "cell_type_ontology_term_id", "cell_type_name"]).to_dict()
    splits = assign_splits(
        columns["cell_id"], columns["donor_id"], columns["dataset_id"],
        np.stack([columns["cell_type"], columns["cell_type_ontology_term_id"], columns["cell_type_name"]], 1),
        by=by, test_size=test_size, seed=seed, held_out_cell_types=held_out_cell_types,
        validation_size=validation_size,
    )
    return DatasetDict({name: dataset.select(np.flatnonzero(splits == name))
                        for name in ("train", "validation", "test", "heldout") if (splits == name).any()})


__all__ = ["assign_splits", "check_test_size", "check_validation_size", "split_dataset"]
