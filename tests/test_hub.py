"""The Hub side, offline: model and dataset cards (metadata parsed back equals what went in), `scmmgpt push` up to the
upload call (dry-run file list, folder checks, mocked `HfApi`), LoRA adapter folders, 4-bit loading on CUDA."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTJobs, ScMMGPTModel
from modeling_scmmgpt.cli import main as cli_main
from modeling_scmmgpt.hub_cards import (
    REQUIRED_TAGS,
    TEMPLATE_DIR,
    eval_results_from_card,
    normalize_eval_results,
    render_dataset_card,
    render_model_card,
    validate_card_metadata,
)
from modeling_scmmgpt.hub_push import assemble_push_folder, check_folder_loads, push_model

from .test_pipelines import LABELS, TEXTS, make_processor, make_stage2, tiny_config

EVAL_RESULTS = {
    "cell-annotation": {"dataset": {"name": "PBMC 68k (reduced)", "type": "scanpy/pbmc68k_reduced", "split": "test"},
                        "metrics": {"accuracy": 0.875, "macro_f1": 0.75}},
    "description": {"dataset": {"name": "PBMC 68k (reduced)", "type": "scanpy/pbmc68k_reduced", "split": "test"},
                    "metrics": {"bleu_2": 0.31, "bleu_4": 0.12, "rouge_l": 0.4, "meteor": 0.35}},
    "text-to-cell": [{"dataset": {"name": "PBMC 68k (reduced)", "type": "scanpy/pbmc68k_reduced"},
                      "metrics": {"knn_accuracy": 0.5}}],
}


@pytest.fixture(scope="module")
def processor(pbmc, minilm_tokenizer):
    return make_processor(pbmc, minilm_tokenizer)


@pytest.fixture(scope="module")
def saved_model(processor, tmp_path_factory):
    """A folder as `save_pretrained` leaves it (no pipelines, no card), plus training leftovers push must leave out."""
    folder = tmp_path_factory.mktemp("hub") / "trained"
    make_stage2(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "optimizer.pt").write_bytes(b"pickle")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    return folder


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------- model card
def test_model_card_metadata_parses_back_equal(saved_model, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, data in snapshot(saved_model).items():  # a copy: render writes README.md into the folder
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    card = render_model_card(folder, EVAL_RESULTS, repo_id="org/scmmgpt-tiny", base_model="meta-llama/Llama-2-7b-hf",
                             datasets=["org/pbmc-text"], tags=["pbmc"], limitations=["Tiny random weights."])
    loaded = ModelCard.load(folder / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    assert eval_results_from_card(loaded) == normalize_eval_results(EVAL_RESULTS)
    data = loaded.data.to_dict()
    widget = json.loads((TEMPLATE_DIR / "widget_examples.json").read_text())
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "any-to-any"
    assert set(REQUIRED_TAGS) | {"pbmc"} <= set(data["tags"])
    assert data["base_model"] == "meta-llama/Llama-2-7b-hf" and data["datasets"] == ["org/pbmc-text"]
    assert data["license"] == "apache-2.0" and data["widget"] == widget
    assert data["metrics"] == ["accuracy", "bleu", "f1", "meteor", "rouge"]
    assert data["model-index"][0]["name"] == "scmmgpt-tiny"
    validate_card_metadata(folder / "README.md")
    body = loaded.text
    for section in ("## How to load", "## The jobs", "## Pipelines", "## Training data", "## Evaluation",
                    "## Limitations", "## Inference Endpoints"):
        assert section in body
    for code in ('AutoModelForCausalLM.from_pretrained("org/scmmgpt-tiny", trust_remote_code=True)', "jobs.annotate(",
                 "jobs.describe(", "jobs.generate_cells(", 'pipeline("text-to-cell"', "BitsAndBytesConfig",
                 "PeftModel.from_pretrained"):
        assert code in body
    assert "| Cell type annotation | PBMC 68k (reduced) | test | accuracy | 0.875 |" in body
    assert ("| Text-conditioned pseudo-cell generation | PBMC 68k (reduced) | – | k-NN vote of held-out cells on "
            "generated cells (rewards type centres) | 0.5 |") in body
    assert "- Tiny random weights." in body


def test_stage1_card_and_card_without_results(processor, tmp_path):
    ScMMGPTModel(tiny_config(processor)).save_pretrained(tmp_path / "stage1")
    processor.save_pretrained(tmp_path / "stage1")
    card = render_model_card(tmp_path / "stage1", None, save=False)
    assert card.data.pipeline_tag == "zero-shot-classification" and card.data.eval_results is None
    assert "jobs.describe(" not in card.text and "jobs.annotate(" in card.text
    assert "AutoModel.from_pretrained" in card.text and "No evaluation results" in card.text
    assert "widget" not in card.data.to_dict()
    validate_card_metadata(card)


def test_bad_metadata_and_eval_results_are_refused(saved_model):
    good = render_model_card(saved_model, {"annotation": {"accuracy": 0.5}}, save=False)
    text = str(good)
    problems = {
        "library_name must be 'transformers'": text.replace("library_name: transformers", "library_name: timm"),
        "tags lack ['custom_code']": text.replace("- custom_code\n", ""),
        "does not parse": text.replace("  - task:\n      type: cell-annotation", "  - tusk:\n      type: cell-annotation"),
        "license is missing": text.replace("license: apache-2.0\n", ""),
    }
    for message, bad in problems.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_card_metadata(bad)
    with pytest.raises(ValueError, match="unknown task 'clustering'"):
        normalize_eval_results({"clustering": {"ari": 0.5}})
    with pytest.raises(ValueError, match="must be a finite number"):
        normalize_eval_results({"annotation": {"accuracy": "high"}})
    assert normalize_eval_results({"annotation": {"accuracy": 1}}) == {"cell-annotation": [{
        "dataset": {"name": "PBMC 68k (reduced), scanpy", "type": "scanpy/pbmc68k_reduced"},
        "metrics": {"accuracy": 1}}]}


# ---------------------------------------------------------------------------------------------------- the demo's card
def evaluation_results() -> dict:
    """What `evaluate_model` returns, model rows and baselines, with the arrays and texts it carries."""
    annotation = {"accuracy": 0.9, "macro_f1": 0.8, "predictions": np.array(["a", "b"])}
    description = {"bleu2": 0.3, "bleu4": 0.1, "rouge1": 0.5, "rouge2": 0.2, "rougeL": 0.4, "meteor": 0.35,
                   "texts": ["x", "y"]}
    return {
        "annotation": {"scMMGPT (retrieval)": annotation, "scMMGPT (likelihood)": {**annotation, "accuracy": 0.7},
                       "scMMGPT (fine-tuned)": {**annotation, "accuracy": 0.95},
                       "logistic regression": {**annotation, "accuracy": 0.123}},
        "description": {"scMMGPT": description, "nearest training cell": {**description, "bleu2": 0.456}},
        "pseudo_cells": {"scMMGPT": {"knn_accuracy": np.float32(0.69), "mean_correlation": 0.93,
                                    "classifier_accuracy": 0.8, "energy_distance": 0.07, "variance_correlation": 0.76,
                                    "detection_correlation": 0.89, "diversity": 0.87,
                                    "expression": np.zeros((2, 3)), "labels": np.array(["a", "b"])},
                         "per-type mean + noise": {"knn_accuracy": 0.789, "mean_correlation": 0.9}},
    }


def copy_folder(source: Path, target: Path) -> Path:
    for name, data in snapshot(source).items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    return target


def test_demo_card_carries_the_held_out_figures_of_the_report(saved_model, tmp_path):
    from types import SimpleNamespace

    from scmmgpt_train.report import write_model_card

    folder = copy_folder(saved_model, tmp_path / "model")
    data = SimpleNamespace(h5ad=None, dataset_dir=None, label_column="bulk_labels", test_size=0.2, split_by="cell",
                           seed=3)
    path = write_model_card(folder, evaluation_results(), SimpleNamespace(data=data, path="configs/tiny-cpu.yaml"))
    card = ModelCard.load(path)
    validate_card_metadata(card)
    assert card.data.to_dict()["model-index"][0]["name"] == "scmmgpt-tiny-cpu"
    held_out = {"name": "PBMC 68k (reduced), scanpy: held-out test split", "type": "scanpy/pbmc68k_reduced",
                "split": "test"}
    assert eval_results_from_card(card) == {
        "cell-annotation": [
            {"dataset": held_out, "method": method, "metrics": {"accuracy": accuracy, "macro_f1": 0.8}}
            for method, accuracy in (("retrieval", 0.9), ("likelihood", 0.7), ("fine-tuned", 0.95))],
        "cell-description": [{"dataset": held_out, "metrics": {
            "bleu_2": 0.3, "bleu_4": 0.1, "rouge_1": 0.5, "rouge_2": 0.2, "rouge_l": 0.4, "meteor": 0.35}}],
        "text-to-cell": [{"dataset": held_out, "metrics": {
            "classifier_accuracy": 0.8, "energy_distance": 0.07, "mean_correlation": 0.93, "variance_correlation": 0.76,
            "detection_correlation": 0.89, "diversity": 0.87, "knn_accuracy": pytest.approx(0.69)}}],
    }
    assert "| Cell type annotation (fine-tuned) | PBMC 68k (reduced), scanpy: held-out test split | test | macro-F1 " \
        "| 0.8 |" in card.text
    assert "seed 3" in card.text and "held out" in card.text
    for baseline in ("0.123", "0.456", "0.789"):  # the baselines' figures belong to the report, not the card
        assert baseline not in str(card)


def test_a_trained_model_folder_carries_label_texts_and_no_training_figures(processor, pbmc, tmp_path):
    import anndata

    from scmmgpt_train.stages import save_final_model

    label_texts = {label: f"cell type: {label}." for label in LABELS}
    folder = tmp_path / "model"
    save_final_model(make_stage2(processor), processor, folder, config_path="train/configs/tiny-cpu.yaml",
                     label_texts=label_texts)
    assert json.loads((folder / "label_texts.json").read_text()) == label_texts
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == "scmmgpt-tiny-cpu" and card.data.eval_results is None
    assert "knn_accuracy" not in str(card) and "No evaluation results" in card.text
    cells = tmp_path / "cells.h5ad"
    anndata.AnnData(X=pbmc.raw.X[:6], var=pbmc.raw.var).write_h5ad(cells)
    assert cli_main(["annotate", str(folder), str(cells), "-o", str(tmp_path / "out.h5ad")]) == 0  # no --labels
    assert set(anndata.read_h5ad(tmp_path / "out.h5ad").obs["scmmgpt_cell_type"]) <= set(LABELS)


def test_model_name_is_never_a_generic_folder_name(saved_model, tmp_path):
    folder = copy_folder(saved_model, tmp_path / "model")
    assert render_model_card(folder, save=False).data.model_name == "scmmgpt-stage2"
    assert render_model_card(folder, model_name="scmmgpt-pbmc", save=False).data.model_name == "scmmgpt-pbmc"
    assert render_model_card(saved_model, save=False).data.model_name == "trained"


def test_load_check_is_a_module_that_imports_nothing_of_the_package():
    """The child runs hub_load_check.py by path where the package must not be importable: it may import only
    outside modules."""
    import ast

    import modeling_scmmgpt.hub_load_check as load_check

    tree = ast.parse(Path(load_check.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not [name for name in imported if name.startswith("modeling_scmmgpt")]
    assert callable(load_check.main)


# ---------------------------------------------------------------------------------------------------- dataset card
def test_dataset_card_from_a_built_dataset(pbmc_path, tmp_path):
    from datasets import load_dataset

    from scmmgpt_train.data import write_dataset

    out = tmp_path / "pbmc-text"
    info = write_dataset(pbmc_path, out, progress=False, split_by="cell", test_size=0.2)
    card = render_dataset_card(out, repo_id="org/pbmc-text")
    loaded = ModelCard.load(out / "README.md", ignore_metadata_errors=False)  # parses as a card
    assert loaded.data.to_dict() == card.data.to_dict()
    assert card.data.size_categories == "n<1K" and {"single-cell", "biology"} <= set(card.data.tags)
    assert f"| cells | {info['n_cells']} |" in card.text
    assert "| 10x_pbmc68k_reduced.h5ad | 700 | raw/X | log1p_normalized | bulk_labels | 10 |" in card.text
    # the card's `configs` make the folder loadable as it will be on the Hub
    test = load_dataset(str(out), split="test")
    assert test.num_rows == info["splits"]["test"]
    with pytest.raises(FileNotFoundError, match="not a built dataset"):
        render_dataset_card(tmp_path)


# ---------------------------------------------------------------------------------------------------- push
def test_push_dry_run_lists_the_assembled_folder(saved_model, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # a dry run must not touch the Hub
    before = snapshot(saved_model)
    assert cli_main(["push", str(saved_model), "org/scmmgpt-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = {line.split("  (")[0].strip() for line in out.splitlines() if line.startswith("  ") and "(" in line
              and not line.strip().startswith("left out")}
    kept = {name for name in before if not name.endswith((".bin", ".pt")) and not name.startswith("checkpoint-")}
    code = {name for name in listed - kept if name.endswith(".py")}  # the pipelines and what they import
    # with the Cell Ontology the pipelines resolve annotate labels in (remote code reads it from the repository)
    assert listed == kept | code | {"README.md", "requirements.txt", "cell_ontology.json.gz"}
    assert {"pipeline_scmmgpt.py", "handler.py"} <= code
    assert {"model.safetensors", "config.json", "modeling_scmmgpt.py", "processor_config.json", "gene_vocab.json",
            "tokenizer.json", "qformer_tokenizer/tokenizer.json"} <= listed
    for left_out in ("training_args.bin (pickle", "optimizer.pt (pickle", "checkpoint-10/ (training artefact)"):
        assert f"left out: {left_out}" in out
    assert "dry run: would upload" in out
    assert snapshot(saved_model) == before  # the source folder is not modified
    assert not [p for p in saved_model.parent.iterdir() if p.name.startswith(".scmmgpt-push-")]  # staging removed


def test_push_uploads_the_checked_folder(saved_model, monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            calls.append(("upload_folder", kwargs, {
                "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
                "config": json.loads((folder / "config.json").read_text()),
                "card": ModelCard.load(folder / "README.md"),
            }))
            return type("Commit", (), {"commit_url": "https://huggingface.co/org/scmmgpt-tiny/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = push_model(saved_model, "org/scmmgpt-tiny", private=True, token="hf_test", eval_results=EVAL_RESULTS,
                        check_load=False, log=lambda *_: None)
    assert [c[0] for c in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[0] == ("init", "hf_test")
    assert calls[1] == ("create_repo", "org/scmmgpt-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    kwargs, seen = calls[2][1], calls[2][2]
    assert kwargs["repo_id"] == "org/scmmgpt-tiny" and kwargs["repo_type"] == "model"
    assert kwargs["commit_message"] == "Upload scMMGPT (stage2)"
    assert seen["files"] == [path for path, _ in result["files"]]
    assert seen["config"]["auto_map"]["AutoModelForCausalLM"] == "modeling_scmmgpt.ScMMGPTForConditionalGeneration"
    assert set(seen["config"]["custom_pipelines"]) == {"cell-annotation", "cell-description", "text-to-cell"}
    assert eval_results_from_card(seen["card"]) == normalize_eval_results(EVAL_RESULTS)
    assert result["commit_url"].endswith("/commit/abc") and result["card"] == "rendered"
    assert not Path(kwargs["folder_path"]).exists()  # the staging folder is removed after the upload

    # an existing card is kept (and still validated); --staging-dir keeps the assembled folder
    (tmp_path / "with_card").mkdir()
    for name, data in snapshot(saved_model).items():
        (tmp_path / "with_card" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "with_card" / name).write_bytes(data)
    render_model_card(tmp_path / "with_card", {"annotation": {"accuracy": 0.25}}, repo_id="org/scmmgpt-tiny")
    result = push_model(tmp_path / "with_card", "org/scmmgpt-tiny", dry_run=True, check_load=False,
                        staging_dir=tmp_path / "staged", log=lambda *_: None)
    assert result["card"] == "kept" and (tmp_path / "staged" / "README.md").read_text() == \
        (tmp_path / "with_card" / "README.md").read_text()


def test_push_refuses_folders_that_would_not_work(saved_model, processor, tmp_path, capsys):
    def copy_without(*names):
        target = tmp_path / f"without_{'_'.join(names)}"
        target.mkdir()
        for name, data in snapshot(saved_model).items():
            if name.split("/")[0] not in names:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                (target / name).write_bytes(data)
        return target

    no_weights = copy_without("model.safetensors")
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    cases = [
        ([str(no_weights), "org/x", "--dry-run"], "no safetensors weights (model.safetensors) (it has ['pytorch_model.bin']"),
        ([str(copy_without("processor_config.json")), "org/x", "--dry-run"], "lacks ['processor_config.json']"),
        ([str(saved_model), "not a repo id", "--dry-run"], "invalid repo id"),
        ([str(tmp_path / "nowhere"), "org/x", "--dry-run"], "no model folder"),
    ]
    bad_card = copy_without()
    (bad_card / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a card without the metadata\n")
    cases.append(([str(bad_card), "org/x", "--dry-run"], "library_name must be 'transformers'"))
    for argv, message in cases:
        assert cli_main(["push", *argv]) == 1
        assert message in capsys.readouterr().err


def test_push_is_a_cli_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["push", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--dry-run" in out and "--private" in out and "REPO_ID" in out.upper()


# ---------------------------------------------------------------------------------------------------- adapters
def describe_batch(processor, cells):
    texts = [f"<cell> Describe this cell: cell type: {t}." for t in cells.obs["bulk_labels"]]
    batch = processor(cells=cells, text=texts, cell_kwargs={"use_raw": True}, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch["labels"][:, : 2 + processor.num_query_tokens + 2] = -100
    batch.pop("token_type_ids", None)
    return dict(batch)


def test_lora_adapter_folder_loads_onto_the_base_model(processor, pbmc, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    cells = pbmc[:6]
    base_dir = tmp_path / "base"
    make_stage2(processor).save_pretrained(base_dir)
    processor.save_pretrained(base_dir)

    model = ScMMGPTForConditionalGeneration.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"language_model\..*\.(q_proj|v_proj)",
                        modules_to_save=["cell_to_text_projector", "text_to_cell_projector", "expression_decoder"])
    tuned = get_peft_model(model.train(), config)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned(**describe_batch(processor, cells)).loss.backward()
    optimizer.step()
    tuned.eval()

    def outputs(m):
        with torch.no_grad():
            logits = m(**describe_batch(processor, cells)).logits
        jobs = ScMMGPTJobs(m, processor, verbose=False)  # a PeftModel reads as the model it wraps
        return (logits, jobs.annotate(cells, LABELS, method="likelihood", use_raw=True).scores,
                jobs.generate_cells(TEXTS, n_per_text=2, seed=0, genes=["LYZ", "MS4A1", "NKG7"]).expression)

    expected = outputs(tuned)
    tuned.save_pretrained(tmp_path / "adapter")
    saved = sorted(os.listdir(tmp_path / "adapter"))
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    base = ScMMGPTForConditionalGeneration.from_pretrained(base_dir).eval()
    untuned = outputs(base)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    got = outputs(reloaded)
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert not torch.allclose(untuned[0], expected[0])  # the adapter (and the tuned projectors) changed the model
    assert not np.allclose(untuned[2], expected[2])


@pytest.mark.gpu
def test_language_model_loads_in_4bit_on_cuda(processor, pbmc, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("4-bit loading needs CUDA")
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    full = make_stage2(processor)
    full.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    model = ScMMGPTForConditionalGeneration.from_pretrained(
        tmp_path / "model", quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cuda").eval()
    jobs = ScMMGPTJobs(model, processor, verbose=False)
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(n.startswith("language_model.") for n in quantised)
    assert all(n.startswith("language_model.") for n in quantised), \
        f"only the LLM part is quantised; also got {[n for n in quantised if not n.startswith('language_model.')]}"
    assert model.get_memory_footprint() < full.get_memory_footprint()
    scores = jobs.annotate(pbmc[:4], LABELS, method="likelihood", use_raw=True).scores
    assert scores.shape == (4, len(LABELS)) and np.isfinite(scores).all()
    assert len(jobs.describe(pbmc[:2], max_new_tokens=4, use_raw=True)) == 2
    assert np.isfinite(jobs.generate_cells(TEXTS, seed=0).expression).all()


def test_load_check_catches_incomplete_weights(saved_model, tmp_path):
    from safetensors.torch import load_file, save_file

    staged = tmp_path / "staged"
    assemble_push_folder(saved_model, staged, repo_id="org/x")
    weights = staged / "model.safetensors"
    tensors = load_file(weights)
    dropped = next(k for k in tensors if k.startswith("expression_decoder."))
    del tensors[dropped]
    weights.unlink()  # hard-linked to the source folder: replace, never write through
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=f"loads but not completely: missing_keys: .*{dropped}"):
        check_folder_loads(staged)


def test_fine_tuned_classifier_folder_assembles_and_loads_as_remote_code(processor, tmp_path):
    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellForClassification

    labels = ["B cell", "T cell", "monocyte"]
    config = ScMMGPTCellConfig.tiny(vocab_size=len(processor.feature_extractor), num_labels=3,
                                    id2label=dict(enumerate(labels)), classifier_pooling="expression_mean")
    ScMMGPTCellForClassification(config).save_pretrained(tmp_path / "classifier")
    processor.feature_extractor.save_pretrained(tmp_path / "classifier")
    report = assemble_push_folder(tmp_path / "classifier", tmp_path / "staged", repo_id="org/classifier")
    assert report["kind"] == "classifier" and report["card"] == "rendered"
    config = json.loads((tmp_path / "staged" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_cell_classification.ScMMGPTCellForClassification")
    card = ModelCard.load(tmp_path / "staged" / "README.md")
    assert card.data.pipeline_tag == "tabular-classification" and "fine-tuned cell type classifier" in card.text
    assert "expression_mean pooling" in card.text and "Q-Former" not in card.text
    loaded = check_folder_loads(tmp_path / "staged")
    assert loaded["model_class"] == "ScMMGPTCellForClassification" and loaded["remote_code"]


def test_cell_encoder_folder_assembles_without_pipelines(processor, tmp_path):
    from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel

    encoder = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=len(processor.feature_extractor)))
    encoder.save_pretrained(tmp_path / "encoder")
    processor.feature_extractor.save_pretrained(tmp_path / "encoder")
    report = assemble_push_folder(tmp_path / "encoder", tmp_path / "staged", repo_id="org/encoder")
    assert report["kind"] == "encoder" and report["card"] == "rendered"
    files = {p.name for p in (tmp_path / "staged").iterdir()}
    assert {"model.safetensors", "preprocessor_config.json", "gene_vocab.json", "modeling_cell_encoder.py"} <= files
    assert not files & {"handler.py", "pipeline_scmmgpt.py", "cell_ontology.json.gz"}  # no pipelines, no handler
    card = ModelCard.load(tmp_path / "staged" / "README.md")
    assert card.data.pipeline_tag == "feature-extraction" and "AutoFeatureExtractor.from_pretrained" in card.text
