"""The Hugging Face Hub side of scMMGPT: model and dataset cards, push-ready folders, `scmmgpt push`.

- `render_model_card(model_dir, eval_results)`: README.md with YAML metadata (library, pipeline tag, tags, base model,
  datasets, license, metrics, widget examples, `model-index` from the evaluation results) and a body saying how to
  load the model, the three jobs with code, training data, the evaluation table and limitations.
- `render_dataset_card(dataset_dir)`: README.md of a folder built by `scmmgpt build-dataset` (reads `build_info.json`).
- `validate_card_metadata(card)`: the checks the Hub would make of the metadata, offline, plus ours.
- `assemble_push_folder` / `check_folder_loads` / `push_model` / `push_main` (`scmmgpt push MODEL_DIR REPO_ID`).

Templates live in `hub_cards/` beside the package (`model_card_template.md`, `dataset_card_template.md`,
`widget_examples.json`, `handler.py`, `requirements.txt`).

`eval_results` format (what the demo's evaluation passes in; one entry or a list of entries per task):

    {"cell-annotation": {"dataset": {"name": "PBMC 68k (reduced)", "type": "scanpy/pbmc68k_reduced", "split": "test"},
                         "metrics": {"accuracy": 0.91, "macro_f1": 0.84}},
     "cell-description": {"metrics": {"bleu_2": 0.31, "bleu_4": 0.12, "rouge_l": 0.40, "meteor": 0.35}},
     "text-to-cell": {"metrics": {"knn_accuracy": 0.62}}}

Task keys may also be `annotation`, `description`, `generation`; an entry may be a bare `{metric: value}` dict; a
missing dataset defaults to the card's first training dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CARD_DIR = Path(__file__).resolve().parent.parent / "hub_cards"
PACKAGE_DIR = Path(__file__).resolve().parent

REQUIRED_TAGS = ("single-cell", "biology", "custom_code")
DEFAULT_TAGS = ["single-cell", "biology", "scRNA-seq", "transcriptomics", "multimodal", "scmmgpt", "custom_code"]
TASK_ALIASES = {
    "cell-annotation": "cell-annotation", "annotation": "cell-annotation", "annotate": "cell-annotation",
    "cell_annotation": "cell-annotation",
    "cell-description": "cell-description", "description": "cell-description", "describe": "cell-description",
    "cell_description": "cell-description",
    "text-to-cell": "text-to-cell", "generation": "text-to-cell", "generate": "text-to-cell",
    "text_to_cell": "text-to-cell", "pseudo-cell-generation": "text-to-cell",
}
TASK_TITLES = {"cell-annotation": "Cell type annotation", "cell-description": "Cell description generation",
               "text-to-cell": "Text-conditioned pseudo-cell generation"}
# evaluation metric → the Hub / `evaluate` metric id listed in the card's `metrics`
METRIC_IDS = {"accuracy": "accuracy", "macro_f1": "f1", "f1": "f1", "bleu": "bleu", "bleu_2": "bleu",
              "bleu_4": "bleu", "rouge_1": "rouge", "rouge_2": "rouge", "rouge_l": "rouge", "rouge": "rouge",
              "meteor": "meteor", "knn_accuracy": "accuracy"}
DEFAULT_METRICS = {"stage2": ["accuracy", "f1", "bleu", "rouge", "meteor"], "stage1": ["accuracy", "f1"],
                   "encoder": [], "classifier": ["accuracy", "f1"]}
PIPELINE_TAGS = {"stage2": "any-to-any", "stage1": "zero-shot-classification", "encoder": "feature-extraction",
                 "classifier": "tabular-classification"}
CELL_ONLY_KINDS = ("encoder", "classifier")  # folders with a cell tokenizer and no text side
DEFAULT_DATASET = {"name": "PBMC 68k (reduced), scanpy", "type": "scanpy/pbmc68k_reduced"}
# architecture → (config class, auto class, module) of each kind of scMMGPT folder
ARCHITECTURES = {
    "ScMMGPTForConditionalGeneration": ("stage2", "ScMMGPTConfig", "AutoModelForCausalLM", "modeling_scmmgpt"),
    "ScMMGPTModel": ("stage1", "ScMMGPTConfig", "AutoModel", "modeling_scmmgpt"),
    "ScMMGPTCellModel": ("encoder", "ScMMGPTCellConfig", "AutoModel", "modeling_cell_encoder"),
    "ScMMGPTCellForMaskedValuePrediction": ("encoder", "ScMMGPTCellConfig", "AutoModelForMaskedLM",
                                            "modeling_cell_pretraining"),
    "ScMMGPTCellForClassification": ("classifier", "ScMMGPTCellConfig", "AutoModelForSequenceClassification",
                                     "modeling_cell_classification"),
}
# never uploaded: pickles (we publish safetensors only) and training state
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SKIPPED_DIRS = re.compile(r"^(checkpoint-\d+|runs|wandb|logs|__pycache__|hf_modules)$")
SKIPPED_FILES = re.compile(r"^(trainer_state\.json|optimizer.*|scheduler.*|rng_state.*)$")
LOAD_REPORT = "SCMMGPT_LOAD_REPORT "


# ---------------------------------------------------------------------------------------------------- folders
def _read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path, data):
    """Replace a file with JSON (unlinking first, so that a hard-linked original is never written through)."""
    path = Path(path)
    if path.exists():
        path.unlink()
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_kind(config: dict) -> str:
    """`"stage2"`, `"stage1"`, `"encoder"` or `"classifier"` from a `config.json`; ValueError for folders that are not
    scMMGPT's."""
    for architecture in config.get("architectures") or []:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture][0]
    raise ValueError(f"config.json names architectures {config.get('architectures')}, none of which is scMMGPT's "
                     f"({sorted(ARCHITECTURES)}); save the model with save_pretrained first")


def describe_model_folder(model_dir) -> dict:
    """What a card says about a saved folder: kind, auto class, sizes of the parts, vocabulary, preprocessing."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    kind = model_kind(config)
    architecture = next(a for a in config["architectures"] if a in ARCHITECTURES)
    cell = config.get("cell_config", config) if kind not in CELL_ONLY_KINDS else config
    qformer, text = config.get("qformer_config") or {}, config.get("text_config") or {}
    extractor = {}
    if (model_dir / "processor_config.json").is_file():
        extractor = _read_json(model_dir / "processor_config.json").get("feature_extractor", {})
    elif (model_dir / "preprocessor_config.json").is_file():
        extractor = _read_json(model_dir / "preprocessor_config.json")
    n_genes = None
    if (model_dir / "gene_vocab.json").is_file():
        n_genes = len(_read_json(model_dir / "gene_vocab.json").get("gene_names", []))
    arch = {
        "cell_layers": cell.get("num_hidden_layers"), "cell_hidden": cell.get("hidden_size"),
        "cell_heads": cell.get("num_attention_heads"), "value_mode": extractor.get("input_value_mode", "continuous"),
        "n_genes": n_genes if n_genes is not None else cell.get("vocab_size"),
        "max_genes": extractor.get("max_genes", cell.get("max_genes")),
        "normalize": extractor.get("normalize", True), "target_sum": extractor.get("target_sum", 1e4),
        "num_query_tokens": config.get("num_query_tokens"), "qformer_layers": qformer.get("num_hidden_layers"),
        "qformer_hidden": qformer.get("hidden_size"), "cross_attention_frequency": config.get("cross_attention_frequency"),
        "llm_type": text.get("model_type"), "llm_layers": text.get("num_hidden_layers", text.get("n_layer")),
        "llm_hidden": text.get("hidden_size", text.get("n_embd")), "llm_vocab": text.get("vocab_size"),
        "classifier_pooling": config.get("classifier_pooling"), "num_labels": len(config.get("id2label") or {}),
    }
    return {"kind": kind, "architecture": architecture, "auto_class": ARCHITECTURES[architecture][2], "arch": arch,
            "config": config, "llm_name_or_path": text.get("_name_or_path")}


# ---------------------------------------------------------------------------------------------------- eval results
def _check_metric_value(task, metric, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"eval_results[{task!r}] metric {metric!r} must be a finite number, got {value!r}")


def normalize_eval_results(eval_results: dict | None, default_dataset: dict | None = None) -> dict:
    """`eval_results` in any accepted shape → `{task: [{"dataset": {"name", "type", ["split"]}, "metrics": {...}}]}`
    with canonical task names; ValueError for unknown tasks or non-numeric metrics."""
    if not eval_results:
        return {}
    if not isinstance(eval_results, dict):
        raise ValueError(f"eval_results must be a dict of task → results, got {type(eval_results).__name__}")
    default_dataset = dict(default_dataset or DEFAULT_DATASET)
    out: dict[str, list] = {}
    for key, entries in eval_results.items():
        task = TASK_ALIASES.get(str(key))
        if task is None:
            raise ValueError(f"eval_results has unknown task {key!r}; use one of {sorted(TASK_TITLES)}")
        for entry in entries if isinstance(entries, list) else [entries]:
            if not isinstance(entry, dict):
                raise ValueError(f"eval_results[{key!r}] entries must be dicts, got {type(entry).__name__}")
            metrics = entry["metrics"] if "metrics" in entry else {k: v for k, v in entry.items() if k != "dataset"}
            if not metrics:
                raise ValueError(f"eval_results[{key!r}] has no metrics")
            for metric, value in metrics.items():
                _check_metric_value(key, metric, value)
            dataset = {**default_dataset, **(entry.get("dataset") or {})}
            if not dataset.get("name") or not dataset.get("type"):
                raise ValueError(f"eval_results[{key!r}] dataset needs a name and a type, got {dataset}")
            dataset = {k: str(v) for k, v in dataset.items() if k in ("name", "type", "split", "config") and v}
            out.setdefault(task, []).append({"dataset": dataset, "metrics": {str(m): v for m, v in metrics.items()}})
    return out


def _to_eval_result_objects(results: dict) -> list:
    from huggingface_hub import EvalResult

    objects = []
    for task, entries in results.items():
        for entry in entries:
            dataset = entry["dataset"]
            for metric, value in entry["metrics"].items():
                objects.append(EvalResult(
                    task_type=task, task_name=TASK_TITLES[task], dataset_type=dataset["type"],
                    dataset_name=dataset["name"], dataset_split=dataset.get("split"),
                    dataset_config=dataset.get("config"), metric_type=metric, metric_value=value,
                ))
    return objects


def eval_results_from_card(card) -> dict:
    """The normalised `eval_results` a card's `model-index` holds (the inverse of what `render_model_card` writes)."""
    out: dict[str, list] = {}
    for result in card.data.eval_results or []:
        dataset = {"name": result.dataset_name, "type": result.dataset_type}
        if result.dataset_split:
            dataset["split"] = result.dataset_split
        if result.dataset_config:
            dataset["config"] = result.dataset_config
        entries = out.setdefault(result.task_type, [])
        entry = next((e for e in entries if e["dataset"] == dataset), None)
        if entry is None:
            entry = {"dataset": dataset, "metrics": {}}
            entries.append(entry)
        entry["metrics"][result.metric_type] = result.metric_value
    return out


def _eval_rows(results: dict) -> list[dict]:
    rows = []
    for task, entries in results.items():
        for entry in entries:
            for metric, value in entry["metrics"].items():
                rows.append({"task": TASK_TITLES[task], "dataset": entry["dataset"]["name"],
                             "split": entry["dataset"].get("split", "–"), "metric": metric,
                             "value": f"{value:.4g}" if isinstance(value, float) else value})
    return rows


# ---------------------------------------------------------------------------------------------------- cards
def _template(name: str, template_path) -> str:
    path = Path(template_path) if template_path is not None else PACKAGE_DIR / "hub_templates" / name
    if not path.is_file():
        raise FileNotFoundError(f"card template {path} not found (hub_cards/ ships beside the package in the "
                                "repository; pass template_path=...)")
    return str(path)


def _widget_examples() -> list[dict]:
    path = PACKAGE_DIR / "hub_templates" / "widget_examples.json"
    return _read_json(path) if path.is_file() else []


def render_model_card(
    model_dir,
    eval_results: dict | None = None,
    *,
    repo_id: str | None = None,
    base_model: str | list[str] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    language: str | list[str] | None = "en",
    tags: list[str] | None = None,
    pipeline_tag: str | None = None,
    widget: list[dict] | None = None,
    training_data: str | None = None,
    limitations: list[str] | None = None,
    species: str = "human",
    example_labels: list[str] | None = None,
    template_path: str | None = None,
    save: bool = True,
):
    """Render the model card of a saved scMMGPT folder.

    Args:
        model_dir: the folder (`config.json`, processor files); read for the architecture and preprocessing.
        eval_results: evaluation results, see the module docstring; they fill `model-index` and the table.
        repo_id: the Hub id the card is for (`org/name`); names the model and fills the code snippets.
        base_model: the Hub id(s) of the models this one starts from (e.g. the LLM); default: the LLM's
            `_name_or_path` when it is a Hub id.
        datasets: Hub dataset ids trained on. license / language / tags / pipeline_tag: metadata (tags are added to
            the defaults, which include single-cell, biology and custom_code).
        widget: widget examples (default: `hub_cards/widget_examples.json` for stage-2 models).
        training_data: the "Training data" section (markdown). limitations: extra limitation bullet points.
        save: write `model_dir/README.md`.

    Returns:
        the `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    info = describe_model_folder(model_dir)
    kind = info["kind"]
    model_name = (repo_id or Path(model_dir).resolve().name).split("/")[-1]
    if base_model is None:
        llm = info["llm_name_or_path"]
        if kind == "stage2" and isinstance(llm, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", llm) and not os.path.exists(llm):
            base_model = llm
    datasets = list(datasets) if datasets else None
    default_dataset = ({"name": datasets[0], "type": datasets[0]} if datasets else None)
    results = normalize_eval_results(eval_results, default_dataset)
    metrics = sorted({METRIC_IDS.get(m, m) for entries in results.values() for e in entries for m in e["metrics"]}) \
        or DEFAULT_METRICS[kind] or None
    all_tags = list(DEFAULT_TAGS)
    for tag in tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    if widget is None and kind == "stage2":
        widget = _widget_examples() or None
    card_data = ModelCardData(
        model_name=model_name, library_name="transformers", pipeline_tag=pipeline_tag or PIPELINE_TAGS[kind],
        tags=all_tags, base_model=base_model, datasets=datasets, license=license, language=language,
        metrics=metrics, eval_results=_to_eval_result_objects(results) or None, widget=widget,
    )
    labels = example_labels or ["CD14+ Monocyte", "CD19+ B", "CD8+ Cytotoxic T"]
    if training_data is None:
        training_data = (
            "Cells paired with text built from their metadata and the Cell Ontology definition of their cell type "
            "(`cell type: X. <CL definition>`), with `scmmgpt build-dataset`"
            + (": " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets) if datasets else "")
            + ". Stage 1 aligns cells and text (contrastive, matching and captioning losses); stage 2 tunes the "
            "language model with LoRA on descriptions and on text → cell generation."
        )
    card = ModelCard.from_template(
        card_data, template_path=_template("model_card_template.md", template_path),
        model_name=model_name, model_id=repo_id or str(model_dir), kind=kind, arch=info["arch"],
        auto_class=info["auto_class"],
        processor_class="AutoFeatureExtractor" if kind in CELL_ONLY_KINDS else "AutoProcessor",
        example_labels=json.dumps(labels),
        example_text="cell type: CD14-positive monocyte. A classical monocyte that expresses CD14 at high levels.",
        eval_rows=_eval_rows(results), training_data=training_data, species=species,
        extra_limitations=list(limitations or []),
    )
    if save:
        card.save(str(Path(model_dir) / "README.md"))
    return card


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < bound:
            return label
    return "100M<n<1B"


def render_dataset_card(dataset_dir, *, repo_id: str | None = None, pretty_name: str | None = None,
                        license: str = "cc-by-4.0", tags: list[str] | None = None, template_path: str | None = None,
                        save: bool = True):
    """Render the dataset card of a folder written by `scmmgpt build-dataset` (its `build_info.json`): splits as
    parquet `configs`, sizes, sources, label mapping summary, how to load, limitations. Returns a `DatasetCard`."""
    from huggingface_hub import DatasetCard, DatasetCardData

    dataset_dir = Path(dataset_dir)
    info_path = dataset_dir / "build_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{dataset_dir}: not a built dataset (no build_info.json); build it with "
                                "`scmmgpt build-dataset`")
    info = _read_json(info_path)
    name = (repo_id or dataset_dir.resolve().name).split("/")[-1]
    splits = info.get("splits") or {}
    shards = info.get("shards") or {}
    configs = [{"config_name": "default",
                "data_files": [{"split": s, "path": f"{s}/*.parquet"} for s in sorted(shards or splits)]}]
    card_data = DatasetCardData(
        license=license, pretty_name=pretty_name or name, size_categories=_size_category(int(info.get("n_cells", 0))),
        tags=["single-cell", "biology", "scRNA-seq", "cell-ontology", "scmmgpt", *(tags or [])],
        task_categories=["text-generation", "zero-shot-classification"], configs=configs,
    )
    sources = []
    for source in info.get("sources", []):
        labels = source.get("labels") or {}
        if {"mapped", "unmapped"} & set(labels):  # LabelMapping.to_dict(): {"mapped": {...}, "unmapped": {...}}
            labels = {**(labels.get("mapped") or {}), **(labels.get("unmapped") or {})}
        sources.append({"name": Path(str(source.get("name"))).name, "n_cells": source.get("n_cells"),
                        "matrix": source.get("matrix"), "value_kind": source.get("value_kind"),
                        "label_column": source.get("label_column"), "n_labels": len(labels)})
    card = DatasetCard.from_template(
        card_data, template_path=_template("dataset_card_template.md", template_path),
        pretty_name=pretty_name or name, repo_id=repo_id or str(dataset_dir), n_cells=info.get("n_cells"),
        splits=splits, split_by=info.get("split_by") or "none (one split)",
        held_out=info.get("held_out_cell_types") or [], value_kinds=info.get("value_kinds") or [],
        vocab_size=info.get("vocab_size"), ontology_version=info.get("ontology_version"), sources=sources,
        unmapped=sorted(info.get("unmapped_labels") or {}),
    )
    if save:
        card.save(str(dataset_dir / "README.md"))
    return card


def validate_card_metadata(card) -> None:
    """Offline checks of a model card (a `ModelCard`, its text, or a README path): the metadata parses (model-index
    included), `library_name: transformers`, the required tags, a pipeline tag, a license, numeric metrics, well-formed
    base model / datasets / widget, and a body. Raises ValueError listing every problem."""
    from huggingface_hub import ModelCard

    if isinstance(card, (str, os.PathLike)) and os.path.isfile(card):
        card = Path(card).read_text(encoding="utf-8")
    try:  # ignore_metadata_errors=False: a malformed model-index raises here, as the Hub would refuse it
        card = card if isinstance(card, ModelCard) else ModelCard(card, ignore_metadata_errors=False)
    except Exception as error:
        raise ValueError(f"the model card's metadata does not parse: {error}") from error
    data, problems = card.data.to_dict(), []
    if data.get("library_name") != "transformers":
        problems.append(f"library_name must be 'transformers', got {data.get('library_name')!r}")
    missing = [t for t in REQUIRED_TAGS if t not in (data.get("tags") or [])]
    if missing:
        problems.append(f"tags lack {missing}")
    if not isinstance(data.get("pipeline_tag"), str) or not data["pipeline_tag"]:
        problems.append("pipeline_tag is missing")
    if not data.get("license"):
        problems.append("license is missing")
    for key in ("base_model", "datasets"):
        value = data.get(key)
        values = [value] if isinstance(value, str) else value or []
        if not isinstance(values, list) or not all(isinstance(v, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", v)
                                                      for v in values):
            problems.append(f"{key} must be Hub ids (org/name), got {value!r}")
    for i, example in enumerate(data.get("widget") or []):
        if not isinstance(example, dict) or not isinstance(example.get("text", example.get("src")), str):
            problems.append(f"widget[{i}] must be an object with a 'text' (or 'src')")
    for result in card.data.eval_results or []:
        value = result.metric_value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"model-index metric {result.metric_type!r} has a non-numeric value {value!r}")
    if not card.text.strip():
        problems.append("the card has no body")
    if problems:
        raise ValueError("model card metadata: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------- push
def _code_modules(folder: Path) -> set[str]:
    """Module names referenced by the folder's `auto_map`s and `custom_pipelines`."""
    refs = []

    def collect(auto_map):
        for value in (auto_map or {}).values():
            refs.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if v)

    config = _read_json(folder / "config.json")
    collect(config.get("auto_map"))
    refs.extend(task["impl"] for task in (config.get("custom_pipelines") or {}).values())
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            data = _read_json(folder / name)
            collect(data.get("auto_map"))
            collect((data.get("feature_extractor") or {}).get("auto_map"))
    return {ref.split("--")[-1].rsplit(".", 1)[0] for ref in refs}


def _add_code_files(folder: Path) -> list[str]:
    """Copy from this package every code file the folder's maps need (and what they import relatively) that the folder
    lacks; the folder's own copies, saved with its weights, are kept. Returns the files added."""
    added, pending, seen = [], sorted(_code_modules(folder)), set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        target = folder / f"{module}.py"
        if not target.is_file():
            source = PACKAGE_DIR / f"{module}.py"
            if not source.is_file():
                raise FileNotFoundError(f"the folder needs {module}.py, which neither it nor the scMMGPT package has")
            shutil.copyfile(source, target)
            added.append(target.name)
        text = target.read_text(encoding="utf-8")
        pending += re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.MULTILINE)
        pending += re.findall(r"^\s*import\s+\.(\w+)\s*$", text, flags=re.MULTILINE)
    return added


def _copy_tree(source: Path, target: Path, skipped: list[str], prefix: str = ""):
    """Copy what belongs on the Hub; weights are hard-linked (never written to afterwards), the rest copied."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        rel = prefix + entry.name
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if SKIPPED_DIRS.match(entry.name):
                skipped.append(f"{rel}/ (training artefact)")
            else:
                _copy_tree(entry, target / entry.name, skipped, rel + "/")
            continue
        if entry.suffix in PICKLE_SUFFIXES:
            skipped.append(f"{rel} (pickle; only safetensors are published)")
            continue
        if SKIPPED_FILES.match(entry.name):
            skipped.append(f"{rel} (training state)")
            continue
        if entry.suffix == ".safetensors":
            try:
                os.link(entry, target / entry.name)
                continue
            except OSError:
                pass
        shutil.copy2(entry, target / entry.name)


def _check_weights(folder: Path, source: Path):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{source}: the weight index lists shards that are missing: {missing}")
    elif not (folder / "model.safetensors").is_file():
        pickles = sorted(p.name for p in source.glob("pytorch_model*.bin"))
        hint = (f" (it has {pickles}: pickle weights are not published; load and re-save with save_pretrained)"
                if pickles else "")
        raise FileNotFoundError(f"{source} has no safetensors weights (model.safetensors){hint}")


def _check_processor_files(folder: Path, kind: str, source: Path):
    needed = ["gene_vocab.json"]
    needed += (["processor_config.json", "tokenizer_config.json"] if kind not in CELL_ONLY_KINDS
               else ["preprocessor_config.json"])
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        what = ("processor.save_pretrained(folder)" if kind not in CELL_ONLY_KINDS
                else "cell_tokenizer.save_pretrained(folder)")
        raise FileNotFoundError(f"{source} lacks {missing}: save the processor into the model folder ({what})")


def assemble_push_folder(model_dir, out_dir, *, repo_id: str | None = None, eval_results: dict | None = None,
                         card_kwargs: dict | None = None) -> dict:
    """Build in `out_dir` (created; must not exist or be empty) the folder to upload from a saved model folder:
    safetensors weights (hard-linked), `config.json` with `auto_map` and `custom_pipelines`, the code files, processor
    files, the model card (rendered when the folder has none or `eval_results` are given; validated either way), and the
    Inference Endpoints `handler.py` + `requirements.txt`. Pickles and training state are left out.

    Returns `{"kind", "skipped": [...], "added": [...], "card": "kept" | "rendered"}`."""
    from .pipeline_scmmgpt import save_pipelines

    source, out = Path(model_dir), Path(out_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a saved model folder (no config.json)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    config = _read_json(source / "config.json")
    kind = model_kind(config)
    skipped: list[str] = []
    _copy_tree(source, out, skipped)
    _check_weights(out, source)
    _check_processor_files(out, kind, source)

    # auto_map: what save_pretrained writes for registered classes; filled in for folders saved without it
    architecture = next(a for a in config["architectures"] if a in ARCHITECTURES)
    _, config_class, auto_class, module = ARCHITECTURES[architecture]
    auto_map = dict(config.get("auto_map") or {})
    auto_map.setdefault("AutoConfig", f"configuration_scmmgpt.{config_class}")
    auto_map.setdefault(auto_class, f"{module}.{architecture}")
    config["auto_map"] = auto_map
    _write_json(out / "config.json", config)
    save_pipelines(out)
    added = _add_code_files(out)

    # the Inference Endpoints handler serves the pipelines; a bare cell encoder has none
    for name in ("handler.py", "requirements.txt") if _read_json(out / "config.json").get("custom_pipelines") else ():
        if not (out / name).exists() and (CARD_DIR / name).is_file():
            shutil.copyfile(CARD_DIR / name, out / name)
            added.append(name)
    card_state = "kept"
    if eval_results is not None or not (out / "README.md").is_file():
        if (out / "README.md").exists():
            (out / "README.md").unlink()
        render_model_card(out, eval_results, repo_id=repo_id, **(card_kwargs or {}))
        card_state = "rendered"
    try:
        validate_card_metadata(out / "README.md")
    except ValueError as error:
        if card_state == "kept":
            raise ValueError(f"{source}/README.md: {error} (delete it to have the card rendered, or pass evaluation "
                             "results, `--eval-results FILE`, to re-render it)") from None
        raise
    return {"kind": kind, "skipped": skipped, "added": added, "card": card_state}


_LOAD_CHECK = r'''
import json, sys, warnings
sys.modules["modeling_scmmgpt"] = None  # as on a machine without the package: only remote code may load
folder = sys.argv[1]
warnings.simplefilter("ignore")
import transformers
from transformers import AutoConfig, AutoFeatureExtractor, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module
import os
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
# the auto class the folder's auto_map gives its architecture (AutoModel for a bare encoder)
auto_class = next((name for name, ref in (config.auto_map or {}).items()
                   if name != "AutoConfig" and ref.split(".")[-1] in (config.architectures or [])), "AutoModel")
auto = getattr(transformers, auto_class)
model, info = auto.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
model.eval()
report = {"model_class": type(model).__name__,
          "remote_code": type(model).__module__.startswith("transformers_modules"),
          "missing_keys": sorted(info.get("missing_keys") or []),
          "unexpected_keys": sorted(info.get("unexpected_keys") or []),
          "mismatched_keys": [str(k) for k in info.get("mismatched_keys") or []], "pipelines": {}}
if os.path.isfile(os.path.join(folder, "processor_config.json")):
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
else:
    processor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
report["processor_class"] = type(processor).__name__
for task, spec in (getattr(config, "custom_pipelines", None) or {}).items():
    pipeline_class = get_class_from_dynamic_module(spec["impl"], folder)
    pipe = pipeline_class(model=model, processor=processor, task=task, device=-1)
    report["pipelines"][task] = pipeline_class.__name__
    if task == "cell-annotation":  # a smoke run of the cheapest job: two cells, retrieval
        genes = list(processor.feature_extractor.gene_names[:16])
        out = pipe({"genes": genes, "counts": [[1.0] * len(genes), [float(i % 3) for i in range(len(genes))]]},
                   labels=["a cell", "another cell"], batch_size=2)
        report["smoke"] = json.loads(json.dumps(out))[0]["label"]
print("SCMMGPT_LOAD_REPORT " + json.dumps(report))
'''


def check_folder_loads(folder, timeout: int = 1800) -> dict:
    """Load `folder` the way a Hub user would, in a fresh interpreter where `modeling_scmmgpt` cannot be imported:
    config, model (`trust_remote_code`, all weights present), processor, each declared pipeline class, and a two-cell
    annotation. Returns the load report; RuntimeError with the child's error when anything fails."""
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="scmmgpt-load-check-") as modules:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules, "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(folder)], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=modules)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(LOAD_REPORT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{folder} does not load with trust_remote_code in a fresh process:\n"
                           + textwrap.indent((proc.stderr or proc.stdout)[-4000:], "  "))
    report = json.loads(lines[-1][len(LOAD_REPORT):])
    problems = [f"{key}: {report[key][:10]}" for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if report[key]]
    if not report["remote_code"]:
        problems.append("the model class did not come from the folder's code")
    if problems:
        raise RuntimeError(f"{folder} loads but not completely: " + "; ".join(problems))
    return report


def list_files(folder) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of every file under `folder`, sorted."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def push_model(model_dir, repo_id: str, *, private: bool = False, dry_run: bool = False, token: str | None = None,
               eval_results: dict | None = None, card_kwargs: dict | None = None, commit_message: str | None = None,
               check_load: bool = True, staging_dir: str | None = None, log=print) -> dict:
    """Assemble (`assemble_push_folder`), validate the card and that the folder loads through `trust_remote_code`
    (`check_folder_loads`), then create the repo (`private` applies when it is created) and upload the folder with
    `HfApi.upload_folder`. `dry_run` does everything but the two Hub calls. The assembled folder is built in a
    temporary folder beside `model_dir` (removed afterwards) or in `staging_dir` (kept).

    Returns `{"repo_id", "files": [(path, bytes)], "dry_run", "skipped", "added", "load_report", "commit_url"}`."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as error:
        raise ValueError(f"invalid repo id {repo_id!r}: {error}") from None
    source = Path(model_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"no model folder at {model_dir}")
    root = None
    if staging_dir is None:  # beside the source, so that weights hard-link instead of copying
        root = Path(tempfile.mkdtemp(prefix=".scmmgpt-push-", dir=source.parent))
        staging = root / re.sub(r"[^\w-]", "_", repo_id.split("/")[-1])
    else:
        staging = Path(staging_dir)
    try:
        assembled = assemble_push_folder(source, staging, repo_id=repo_id, eval_results=eval_results,
                                         card_kwargs=card_kwargs)
        report = check_folder_loads(staging) if check_load else None
        files = list_files(staging)
        result = {"repo_id": repo_id, "files": files, "dry_run": dry_run, "load_report": report,
                  "commit_url": None, **assembled}
        log(f"{'dry run: would upload' if dry_run else 'uploading'} {len(files)} files to {repo_id}:")
        for path, size in files:
            log(f"  {path}  ({size:,} bytes)")
        for entry in assembled["skipped"]:
            log(f"  left out: {entry}")
        if dry_run:
            return result
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(staging), repo_type="model",
                                   commit_message=commit_message or f"Upload scMMGPT ({assembled['kind']})")
        result["commit_url"] = getattr(commit, "commit_url", None) or str(commit)
        log(f"uploaded: {result['commit_url']}")
        return result
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def push_main(argv: list[str] | None = None) -> int:
    """`scmmgpt push MODEL_DIR REPO_ID [--private] [--dry-run]`: check and upload a saved model folder to the Hub."""
    parser = argparse.ArgumentParser(prog="scmmgpt push", description=push_main.__doc__)
    parser.add_argument("model_dir", help="a folder written by save_pretrained (model + processor)")
    parser.add_argument("repo_id", help="the Hub repository, org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private (when it is new)")
    parser.add_argument("--dry-run", action="store_true", help="do everything except the upload; list the files")
    parser.add_argument("--eval-results", help="JSON file of evaluation results for the card (re-renders it)")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message")
    parser.add_argument("--staging-dir", help="assemble the upload here and keep it (default: a temporary folder)")
    parser.add_argument("--skip-load-check", action="store_true",
                        help="skip loading the folder in a fresh process (for models too big for this machine)")
    args = parser.parse_args(argv)
    eval_results = _read_json(args.eval_results) if args.eval_results else None
    try:
        push_model(args.model_dir, args.repo_id, private=args.private, dry_run=args.dry_run, token=args.token,
                   eval_results=eval_results, commit_message=args.commit_message, staging_dir=args.staging_dir,
                   check_load=not args.skip_load_check)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"scmmgpt push: {error}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "assemble_push_folder",
    "check_folder_loads",
    "describe_model_folder",
    "eval_results_from_card",
    "list_files",
    "normalize_eval_results",
    "push_main",
    "push_model",
    "render_dataset_card",
    "render_model_card",
    "validate_card_metadata",
]
