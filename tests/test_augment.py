"""Training-time cell augmentation (train/augment.py): counts reconstructed from log-normalised rows, each transform's
effect, seeding, and the collators applying it to the right cells only."""

import numpy as np
import pytest

from scmmgpt_train.augment import CellAugmentation, row_counts
from scmmgpt_train.sources import COUNTS, LOG_NORMALIZED
from scmmgpt_train.streaming import N_SPECIAL

N_GENES = 400


def count_row(seed=0, cell_id="c0"):
    rng = np.random.default_rng(seed)
    genes = np.sort(rng.choice(N_GENES, 150, replace=False)) + N_SPECIAL
    counts = rng.negative_binomial(2, 0.05, 150).astype(np.float32) + 1
    counts[0] = 1  # a sparse cell's smallest count is 1 (what reconstructing counts from log values relies on)
    return {"cell_id": cell_id, "gene_ids": genes, "expression": counts, "total_counts": float(counts.sum() * 3),
            "value_kind": COUNTS}


def only(**settings):
    """An augmentation that always applies the transforms named in `settings` and no other."""
    base = dict(probability=1.0, depth_probability=0.0, batch_probability=0.0, panel_probability=0.0,
                library_basis_probability=0.0)
    return CellAugmentation(**{**base, **settings})


def test_log_normalised_rows_give_back_their_counts():
    row = count_row()
    library = row["total_counts"]
    logged = {**row, "expression": np.round(np.log1p(row["expression"] / library * 1e4), 6),
              "value_kind": LOG_NORMALIZED}
    genes, counts, recovered = row_counts(logged)
    np.testing.assert_array_equal(genes, row["gene_ids"])
    np.testing.assert_allclose(counts, row["expression"])
    assert recovered == pytest.approx(library, rel=0.01)


def test_depth_thinning_keeps_integer_counts_at_the_drawn_share():
    rows = [count_row(seed) for seed in range(20)]
    out = only(depth_probability=1.0, depth_range=[0.2, 0.2])(rows, N_GENES)
    before = sum(r["expression"].sum() for r in rows)
    after = sum(r["expression"].sum() for r in out)
    assert after / before == pytest.approx(0.2, abs=0.02)
    for new, old in zip(out, rows):
        assert np.all(new["expression"] == np.round(new["expression"])) and np.all(new["expression"] > 0)
        assert set(new["gene_ids"]) <= set(old["gene_ids"])
        assert new["total_counts"] == pytest.approx(0.2 * old["total_counts"], rel=0.1)


def test_panel_keeps_one_gene_subset_for_the_whole_batch():
    rows = [count_row(seed) for seed in range(10)]
    out = only(panel_probability=1.0, panel_range=[0.5, 0.5])(rows, N_GENES)
    seen = np.unique(np.concatenate([r["gene_ids"] for r in rows]))
    kept = np.unique(np.concatenate([r["gene_ids"] for r in out]))
    assert 0.35 < kept.size / seen.size < 0.65
    for new, old in zip(out, rows):  # the genes of one shared panel, library unchanged (the file's other genes)
        assert set(new["gene_ids"]) == set(old["gene_ids"]) & set(kept)
        assert new["total_counts"] == pytest.approx(old["total_counts"] - old["expression"].sum()
                                                    + new["expression"].sum())


def test_batch_factors_are_per_gene_and_library_basis_sums_the_genes_present():
    rows = [count_row(seed) for seed in range(30)]
    out = only(batch_probability=1.0, batch_sigma_max=0.6, library_basis_probability=1.0)(rows, N_GENES)
    for new in out:
        assert new["total_counts"] == pytest.approx(new["expression"].sum())
    # one factor per gene across cells: per-gene log ratios spread, and agree between cells
    ratio = {}
    for new, old in zip(out, rows):
        before = dict(zip(old["gene_ids"], old["expression"]))
        for g, v in zip(new["gene_ids"], new["expression"]):
            ratio.setdefault(g, []).append(np.log(v / before[g]) if before[g] >= 20 else np.nan)
    means = np.array([np.nanmean(v) for v in ratio.values() if np.isfinite(v).sum() >= 3])
    assert means.size > 10 and means.std() > 0.05


def test_seeded_and_off_switches():
    rows = [count_row(seed) for seed in range(5)]
    a = CellAugmentation(seed=3, probability=1.0)(rows, N_GENES)
    b = CellAugmentation(seed=3, probability=1.0)(rows, N_GENES)
    c = CellAugmentation(seed=4, probability=1.0)(rows, N_GENES)
    assert all(np.array_equal(x["expression"], y["expression"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["expression"], y["expression"]) for x, y in zip(a, c))
    assert CellAugmentation(enabled=False)(rows, N_GENES) is rows
    assert CellAugmentation().for_stage("stage1").seed != CellAugmentation().for_stage("stage2").seed
    with pytest.raises(ValueError, match="depth_range"):
        CellAugmentation(depth_range=[0.0, 1.0])


def test_a_batch_is_augmented_the_same_whatever_came_before():
    """No state carried from batch to batch: a run resumed from a checkpoint (which saves no collator state) replays
    its remaining batches' augmentations exactly; other batches draw differently."""
    batches = [[count_row(seed, f"c{seed}") for seed in range(start, start + 4)] for start in (0, 4, 8)]
    settings = dict(seed=3, probability=1.0, depth_probability=1.0, batch_probability=1.0)
    run = CellAugmentation(**settings)
    straight = [run(batch, N_GENES) for batch in batches]
    resumed = CellAugmentation(**settings)(batches[2], N_GENES)
    assert all(np.array_equal(x["expression"], y["expression"]) for x, y in zip(straight[2], resumed))
    again = run(batches[0], N_GENES)  # the same cells in the same batch: the same draws
    assert all(np.array_equal(x["expression"], y["expression"]) for x, y in zip(straight[0], again))
    other = CellAugmentation(**settings)(batches[0][:3] + batches[1][:1], N_GENES)
    assert not all(np.array_equal(x["expression"], y["expression"]) for x, y in zip(straight[0][:3], other[:3]))


def test_stage2_collator_augments_input_cells_only(pbmc_path, minilm_tokenizer):
    from modeling_scmmgpt import ScMMGPTProcessor
    from scmmgpt_train.collators import Stage2Collator
    from scmmgpt_train.config import load_config
    from scmmgpt_train.data import build_dataset

    assert load_config("train/configs/tiny-cpu.yaml").augmentation.enabled  # on by default
    dataset, cell_tokenizer = build_dataset(pbmc_path, return_tokenizer=True)
    rows = [dataset[i] for i in range(8)]
    processor = ScMMGPTProcessor(cell_tokenizer, minilm_tokenizer, num_query_tokens=2)
    clean = Stage2Collator(processor, text_to_cell_fraction=0.5, seed=1)
    noisy = Stage2Collator(processor, text_to_cell_fraction=0.5, seed=1,
                           augment=only(depth_probability=1.0, depth_range=[0.1, 0.1]))
    a, b = clean(rows), noisy(rows)
    for key in ("target_gene_ids", "target_expression_values", "decoder_targets", "input_ids"):
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key
    inputs = a["cell_attention_mask"].sum(1) > 1
    assert inputs.any()
    assert (b["cell_attention_mask"].sum(1)[inputs] < a["cell_attention_mask"].sum(1)[inputs]).all()
