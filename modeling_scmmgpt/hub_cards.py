"""Model and dataset cards of scMMGPT folders, offline.

- `render_model_card(model_dir, eval_results)`: README.md with YAML metadata (library, pipeline tag, tags, base model,
  datasets, license, metrics, widget examples, `model-index` from the evaluation results) and a body saying how to
  load the model, the three jobs with code, training data, the evaluation table and limitations.
- `render_dataset_card(dataset_dir)`: README.md of a folder built by `scmmgpt build-dataset` (reads `build_info.json`).
- `validate_card_metadata(card)`: the checks the Hub would make of the metadata, offline, plus ours.

Templates travel inside the package, in `hub_templates/` (`model_card_template.md`, `dataset_card_template.md`,
`widget_examples.json`), so that an installed wheel renders cards too.

`eval_results` format (what the demo's evaluation passes in; one entry or a list of entries per task):

    {"cell-annotation": [{"method": "retrieval",
                          "dataset": {"name": "PBMC 68k (reduced)", "type": "scanpy/pbmc68k_reduced", "split": "test"},
                          "metrics": {"accuracy": 0.91, "macro_f1": 0.84}}],
     "cell-description": {"metrics": {"bleu_2": 0.31, "bleu_4": 0.12, "rouge_l": 0.40, "meteor": 0.35}},
     "text-to-cell": {"metrics": {"knn_accuracy": 0.62, "mean_correlation": 0.9}}}

Task keys may also be `annotation`, `description`, `generation`; an entry may be a bare `{metric: value}` dict; an
optional `method` names how the task was done (it becomes part of the metric names); a missing dataset defaults to the
card's first training dataset.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .kinds_scmmgpt import model_kind

TEMPLATE_DIR = Path(__file__).resolve().parent / "hub_templates"

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
              "meteor": "meteor", "knn_accuracy": "accuracy", "mean_correlation": "pearsonr",
              "classifier_accuracy": "accuracy", "variance_correlation": "pearsonr", "detection_correlation": "pearsonr"}
# evaluation metric → how the card's table and model-index name it
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "bleu_2": "BLEU-2", "bleu_4": "BLEU-4",
                "rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L", "meteor": "METEOR",
                "knn_accuracy": "k-NN vote of held-out cells on generated cells (rewards type centres)",
                "mean_correlation": "correlation of generated and real per-type mean expression",
                "classifier_accuracy": "accuracy of a classifier trained on real cells, on generated cells",
                "energy_distance": "energy distance to real cells of the type (PCA 50, lower is better)",
                "variance_correlation": "correlation of generated and real per-type gene variances",
                "detection_correlation": "correlation of generated and real per-type gene detection rates",
                "diversity": "within-type spread relative to real cells (1 is real)"}
DEFAULT_METRICS = {"stage2": ["accuracy", "f1", "bleu", "rouge", "meteor"], "stage1": ["accuracy", "f1"],
                   "encoder": [], "classifier": ["accuracy", "f1"]}
PIPELINE_TAGS = {"stage2": "any-to-any", "stage1": "zero-shot-classification", "encoder": "feature-extraction",
                 "classifier": "tabular-classification"}
CELL_ONLY_KINDS = ("encoder", "classifier")  # folders with a cell tokenizer and no text side
DEFAULT_DATASET = {"name": "PBMC 68k (reduced), scanpy", "type": "scanpy/pbmc68k_reduced"}
# folder names that say where a model was saved, not what it is: the card names such a model after its kind
GENERIC_FOLDER_NAMES = re.compile(r"^(model|final|output|stage\w*|classifier|checkpoint-\d+|tmp\w*)$")


def read_json(path) -> dict:
    """The JSON object in a file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------- folders
def _preprocessing(model_dir: Path) -> tuple[dict, int | None]:
    """The cell tokenizer's settings and the number of genes in the vocabulary of a saved folder."""
    extractor = {}
    if (model_dir / "processor_config.json").is_file():
        extractor = read_json(model_dir / "processor_config.json").get("feature_extractor", {})
    elif (model_dir / "preprocessor_config.json").is_file():
        extractor = read_json(model_dir / "preprocessor_config.json")
    n_genes = None
    if (model_dir / "gene_vocab.json").is_file():
        n_genes = len(read_json(model_dir / "gene_vocab.json").get("gene_names", []))
    return extractor, n_genes


def describe_model_folder(model_dir) -> dict:
    """What a card says about a saved folder: kind, auto class, sizes of the parts, vocabulary, preprocessing."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    kind = model_kind(config)
    cell = config.get("cell_config", config) if kind.name not in CELL_ONLY_KINDS else config
    qformer, text = config.get("qformer_config") or {}, config.get("text_config") or {}
    extractor, n_genes = _preprocessing(model_dir)
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
    return {"kind": kind.name, "architecture": kind.architecture, "auto_class": kind.auto_class, "arch": arch,
            "config": config, "llm_name_or_path": text.get("_name_or_path")}


# ---------------------------------------------------------------------------------------------------- eval results
def _check_metric_value(task, metric, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"eval_results[{task!r}] metric {metric!r} must be a finite number, got {value!r}")


def _normalize_entry(key, entry, default_dataset: dict) -> dict:
    """One eval_results entry → `{"dataset", "metrics"[, "method"]}`; ValueError when malformed."""
    if not isinstance(entry, dict):
        raise ValueError(f"eval_results[{key!r}] entries must be dicts, got {type(entry).__name__}")
    metrics = entry["metrics"] if "metrics" in entry else {
        k: v for k, v in entry.items() if k not in ("dataset", "method")}
    if not metrics:
        raise ValueError(f"eval_results[{key!r}] has no metrics")
    for metric, value in metrics.items():
        _check_metric_value(key, metric, value)
    dataset = {**default_dataset, **(entry.get("dataset") or {})}
    if not dataset.get("name") or not dataset.get("type"):
        raise ValueError(f"eval_results[{key!r}] dataset needs a name and a type, got {dataset}")
    dataset = {k: str(v) for k, v in dataset.items() if k in ("name", "type", "split", "config") and v}
    normalized = {"dataset": dataset, "metrics": {str(m): v for m, v in metrics.items()}}
    if entry.get("method"):
        normalized["method"] = str(entry["method"])
    return normalized


def normalize_eval_results(eval_results: dict | None, default_dataset: dict | None = None) -> dict:
    """`eval_results` in any accepted shape → `{task: [{"dataset": {"name", "type", ["split"]}, "metrics": {...},
    ["method"]}]}` with canonical task names; ValueError for unknown tasks or non-numeric metrics."""
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
            out.setdefault(task, []).append(_normalize_entry(key, entry, default_dataset))
    return out


def _with_method(name: str, method: str | None) -> str:
    return name + (f" ({method})" if method else "")


def _metric_name(metric: str, method: str | None) -> str | None:
    """The model-index metric name; it carries the method, since the Hub merges results that differ only in task
    name (one result per task, dataset and split)."""
    return _with_method(METRIC_NAMES.get(metric, metric), method) if method or metric in METRIC_NAMES else None


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
                    metric_name=_metric_name(metric, entry.get("method")),
                ))
    return objects


def _method_of(result) -> str | None:
    """The method a model-index metric name carries (`"macro-F1 (retrieval)"` → `"retrieval"`)."""
    prefix = METRIC_NAMES.get(result.metric_type, result.metric_type) + " ("
    name = result.metric_name or ""
    return name[len(prefix):-1] if name.startswith(prefix) and name.endswith(")") else None


def eval_results_from_card(card) -> dict:
    """The normalised `eval_results` a card's `model-index` holds (the inverse of what `render_model_card` writes)."""
    out: dict[str, list] = {}
    for result in card.data.eval_results or []:
        dataset = {"name": result.dataset_name, "type": result.dataset_type}
        if result.dataset_split:
            dataset["split"] = result.dataset_split
        if result.dataset_config:
            dataset["config"] = result.dataset_config
        method = _method_of(result)
        entries = out.setdefault(result.task_type, [])
        entry = next((e for e in entries if e["dataset"] == dataset and e.get("method") == method), None)
        if entry is None:
            entry = {"dataset": dataset, "metrics": {}, **({"method": method} if method else {})}
            entries.append(entry)
        entry["metrics"][result.metric_type] = result.metric_value
    return out


def _eval_rows(results: dict) -> list[dict]:
    rows = []
    for task, entries in results.items():
        for entry in entries:
            for metric, value in entry["metrics"].items():
                rows.append({"task": _with_method(TASK_TITLES[task], entry.get("method")),
                             "dataset": entry["dataset"]["name"],
                             "split": entry["dataset"].get("split", "–"), "metric": METRIC_NAMES.get(metric, metric),
                             "value": f"{value:.4g}" if isinstance(value, float) else value})
    return rows


# ---------------------------------------------------------------------------------------------------- cards
def _template(name: str, template_path) -> str:
    path = Path(template_path) if template_path is not None else TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"card template {path} not found (pass template_path=...)")
    return str(path)


def _widget_examples() -> list[dict]:
    path = TEMPLATE_DIR / "widget_examples.json"
    return read_json(path) if path.is_file() else []


def _model_name(model_dir, repo_id: str | None, model_name: str | None, kind: str) -> str:
    """The card's model name: given, else the repo's, else the folder's unless it only says where the model lies."""
    if model_name:
        return model_name
    if repo_id:
        return repo_id.split("/")[-1]
    folder = Path(model_dir).resolve().name
    return f"scmmgpt-{kind}" if GENERIC_FOLDER_NAMES.match(folder) else folder


def _default_base_model(info: dict):
    """The LLM's Hub id when a stage-2 folder was built from one (not from a local folder)."""
    llm = info["llm_name_or_path"]
    if info["kind"] == "stage2" and isinstance(llm, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", llm) \
            and not os.path.exists(llm):
        return llm
    return None


def _training_data(datasets: list[str] | None) -> str:
    return (
        "Cells paired with text built from their metadata and the Cell Ontology definition of their cell type "
        "(`cell type: X. <CL definition>`), with `scmmgpt build-dataset`"
        + (": " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets) if datasets else "")
        + ". Stage 1 aligns cells and text (contrastive, matching and captioning losses); stage 2 tunes the "
        "language model with LoRA on descriptions and on text → cell generation."
    )


def render_model_card(
    model_dir,
    eval_results: dict | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
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
        model_name: the name in the title and `model-index` (default: the repo's name, else the folder's, else
            `scmmgpt-<kind>` when the folder's name is generic such as `model`).
        base_model: the Hub id(s) of the models this one starts from (e.g. the LLM); default: the LLM's
            `_name_or_path` when it is a Hub id.
        datasets: Hub dataset ids trained on. license / language / tags / pipeline_tag: metadata (tags are added to
            the defaults, which include single-cell, biology and custom_code).
        widget: widget examples (default: the packaged `hub_templates/widget_examples.json` for stage-2 models).
        training_data: the "Training data" section (markdown). limitations: extra limitation bullet points.
        save: write `model_dir/README.md`.

    Returns:
        the `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    info = describe_model_folder(model_dir)
    kind = info["kind"]
    model_name = _model_name(model_dir, repo_id, model_name, kind)
    base_model = base_model if base_model is not None else _default_base_model(info)
    datasets = list(datasets) if datasets else None
    default_dataset = ({"name": datasets[0], "type": datasets[0]} if datasets else None)
    results = normalize_eval_results(eval_results, default_dataset)
    metrics = sorted({METRIC_IDS.get(m, m) for entries in results.values() for e in entries for m in e["metrics"]}) \
        or DEFAULT_METRICS[kind] or None
    all_tags = list(dict.fromkeys([*DEFAULT_TAGS, *(tags or [])]))
    if widget is None and kind == "stage2":
        widget = _widget_examples() or None
    card_data = ModelCardData(
        model_name=model_name, library_name="transformers", pipeline_tag=pipeline_tag or PIPELINE_TAGS[kind],
        tags=all_tags, base_model=base_model, datasets=datasets, license=license, language=language,
        metrics=metrics, eval_results=_to_eval_result_objects(results) or None, widget=widget,
    )
    card = ModelCard.from_template(
        card_data, template_path=_template("model_card_template.md", template_path),
        model_name=model_name, model_id=repo_id or str(model_dir), kind=kind, arch=info["arch"],
        auto_class=info["auto_class"],
        processor_class="AutoFeatureExtractor" if kind in CELL_ONLY_KINDS else "AutoProcessor",
        example_labels=json.dumps(example_labels or ["CD14+ Monocyte", "CD19+ B", "CD8+ Cytotoxic T"]),
        example_text="cell type: CD14-positive monocyte. A classical monocyte that expresses CD14 at high levels.",
        eval_rows=_eval_rows(results), training_data=training_data or _training_data(datasets), species=species,
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
    info = read_json(info_path)
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


__all__ = [
    "describe_model_folder",
    "eval_results_from_card",
    "normalize_eval_results",
    "read_json",
    "render_dataset_card",
    "render_model_card",
    "validate_card_metadata",
]
