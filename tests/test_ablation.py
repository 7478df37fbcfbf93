"""`scmmgpt_train.ablation`: stage-1 variants from one shared stage-0 encoder per seed, scored under the short shift
suite, and the mean ± sd table."""

import json

import pytest
import yaml

from scmmgpt_train.ablation import MARKER_RETRIEVAL, ablation_table, load_markers, main, parse_variant
from scmmgpt_train.ablation import unseen_ablation_table
from scmmgpt_train.robustness import LOGISTIC, MARKER_SCORE, RETRIEVAL, SEEN, UNSEEN, held_out_types
from scmmgpt_train.shifts import SHORT_SUITE

from .test_training import few_steps


def test_variants_parse_into_config_overrides():
    assert parse_variant(["base"]) == ("base", {})
    assert parse_variant(["t", "model.contrastive_temperature=0.02", "stage1.freeze_cell_encoder=true"]) == (
        "t", {"model.contrastive_temperature": 0.02, "stage1.freeze_cell_encoder": True})
    with pytest.raises(ValueError, match="starts with its name"):
        parse_variant(["stage1.max_steps=600"])
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        parse_variant(["steps", "max_steps=600"])


def test_table_gives_mean_and_sd_over_seeds_with_the_reference_row():
    def row(retrieval, logistic):
        return {"clean": {RETRIEVAL + ": accuracy": retrieval, LOGISTIC + ": accuracy": logistic}}

    table = ablation_table({"base": {0: row(0.7, 0.9), 1: row(0.8, 0.8)}, "other": {0: row(0.5, 0.9), 1: row(0.5, 0.8)}})
    lines = table.splitlines()
    assert lines[0] == "| stage 1 (seeds 0, 1) | clean |"
    assert lines[2] == "| base | 0.750 ± 0.050 |" and lines[3] == "| other | 0.500 ± 0.000 |"
    assert lines[4] == f"| reference: {LOGISTIC} | 0.850 ± 0.050 |"


def test_unseen_table_and_markers(tmp_path):
    def row(unseen, seen):
        return {UNSEEN: {f"{RETRIEVAL}: top-1": unseen, f"{RETRIEVAL}: top-3": 1.0},
                SEEN: {f"{RETRIEVAL}: top-1": seen, f"{RETRIEVAL}: top-3": 1.0}}

    lines = unseen_ablation_table({"base": {0: row(0.0, 0.8), 1: row(0.2, 0.6)}}).splitlines()
    assert lines[0] == f"| stage 1 | texts | {UNSEEN}: top-1 | {UNSEEN}: top-3 | {SEEN}: top-1 | {SEEN}: top-3 |"
    assert lines[2] == f"| base | {RETRIEVAL} | 0.100 ± 0.100 | 1.000 ± 0.000 | 0.700 ± 0.100 | 1.000 ± 0.000 |"
    shipped = load_markers("train/configs/pbmc_markers.yaml", {"CD19+ B", "CD56+ NK"})
    assert shipped["CD19+ B"] == ["MS4A1", "CD79A", "CD79B"] and len(shipped) == 10
    with pytest.raises(ValueError, match=r"no marker genes for \['Mast cell'\]"):
        load_markers("train/configs/pbmc_markers.yaml", {"CD19+ B", "Mast cell"})
    written = tmp_path / "markers.yaml"
    written.write_text("B: MS4A1, CD79A\nNK: []\n")
    with pytest.raises(ValueError, match=r"no marker genes for \['NK'\]"):
        load_markers(str(written), ["B", "NK"])
    assert load_markers(str(written), ["B"])["B"] == ["MS4A1", "CD79A"]
    written.write_text("B: [MS4A1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_markers(str(written), ["B"])


def test_variants_train_stage1_from_one_encoder_and_are_scored_under_shifts(tmp_path, capsys, pbmc):
    config = few_steps(2)
    config["stage1"].update(eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    path = tmp_path / "few.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "ablation"
    assert main(["--config", str(path), "--seeds", "0", "--output-dir", str(out), "--quiet",
                 "--variant", "base", "--variant", "warm", "model.contrastive_temperature=0.5",
                 "stage1.expressed_genes_probability=0.5", "--unseen-types",
                 "--markers", "train/configs/pbmc_markers.yaml"]) == 0

    seed = out / "seed_0"
    assert (seed / "stage0_cell" / "COMPLETE.json").exists()  # stage 0 once per seed, shared by the variants
    assert not (seed / "base" / "stage0_cell").exists() and not (seed / "warm" / "stage0_cell").exists()
    temperatures = {name: json.loads((seed / name / "stage1" / "config.json").read_text())["contrastive_temperature"]
                    for name in ("base", "warm")}
    assert temperatures == {"base": 0.07, "warm": 0.5}
    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"] == {"base": {}, "warm": {"model.contrastive_temperature": 0.5,
                                                      "stage1.expressed_genes_probability": 0.5}}
    for name in ("base", "warm"):
        rows = saved["results"][name]["0"]
        assert list(rows) == [shift.name for shift in SHORT_SUITE]
        assert all(0.0 <= row[RETRIEVAL + ": accuracy"] <= 1.0 for row in rows.values())
    logistic = saved["results"]["base"]["0"]["clean"][LOGISTIC + ": accuracy"]
    assert logistic > 0.7  # the reference is trained on the seed's clean training cells, as in make eval
    table = (out / "ablation.md").read_text()
    assert "| base |" in table and "| warm |" in table and f"| reference: {LOGISTIC} |" in table
    assert "seed 0 warm: retrieval clean" in capsys.readouterr().out

    # held out: the three types make eval holds out for seed 0
    assert saved["held_out_cell_types"]["0"] == held_out_types(pbmc.obs["bulk_labels"], 0)
    assert (seed / "unseen" / "stage0_cell" / "COMPLETE.json").exists()
    for name in ("base", "warm"):
        groups = saved["unseen"][name]["0"]
        assert set(groups) == {UNSEEN, SEEN}
        for method in (RETRIEVAL, MARKER_RETRIEVAL):
            for group in (UNSEEN, SEEN):
                top1, top3 = groups[group][f"{method}: top-1"], groups[group][f"{method}: top-3"]
                assert 0.0 <= top1 <= top3 <= 1.0
        # the marker lists' own reference, without a model: the same for every variant
        assert groups[UNSEEN][MARKER_SCORE + ": top-1"] == saved["unseen"]["base"]["0"][UNSEEN][MARKER_SCORE + ": top-1"]
        assert groups[UNSEEN][MARKER_SCORE + ": top-1"] > 0.3  # NK, cytotoxic T, dendritic: their markers name them
    assert f"| warm | {MARKER_RETRIEVAL} |" in table and f"| base | {MARKER_SCORE} |" in table
