"""transformers pipelines for the jobs of scMMGPT: `cell-annotation`, `cell-description`, `text-to-cell`.

    from transformers import pipeline
    annotate = pipeline("cell-annotation", model="org/scmmgpt", trust_remote_code=True)
    annotate("pbmc.h5ad", batch_size=32)         # labels: the model's own cell types unless labels=[...] is given
    # → [{"cell": "AAAC…-1", "label": "CD14+ Monocyte", "score": 0.71, "top_labels": [...]}, ...]

Cell inputs are whatever `inputs_scmmgpt.read_cells` reads (AnnData, `.h5ad` path, gene → count dicts, the endpoint
payload `{"genes": [...], "counts": [[...]]}`, a matrix with `gene_names=`), with the same input options (`layer`,
`use_raw`, `gene_column`, `normalize`) and the same decision on which matrix and values as the CLI and the Python API:
the pipelines are a thin layer over `jobs_scmmgpt.ScMMGPTJobs`. One call takes all the cells and returns one result
per cell; `batch_size` is the number of cells (or texts) per forward pass. Outputs are JSON-serialisable;
`text-to-cell` can return an AnnData with `return_anndata=True`.

A model folder carries these pipelines as remote code: `save_pipelines(folder)` copies this file and the jobs files it
imports, with the Cell Ontology they read (`cell_ontology.json.gz`), into the folder and lists the tasks in
`config.json` (`custom_pipelines`), so `pipeline(task, model=folder, trust_remote_code=True)` works in a fresh process,
and where this package is not installed.
"""

import json
import os
import shutil

import numpy as np
import transformers
from transformers import AutoConfig, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .inputs_scmmgpt import check_positive_int
from .jobs_scmmgpt import ScMMGPTJobs, read_label_texts, kind_of_model, model_kind
from .ontology_scmmgpt import ONTOLOGY_FILE, shipped_ontology_file

# task → (pipeline class name, the job it runs)
PIPELINE_TASKS = {
    "cell-annotation": ("CellAnnotationPipeline", "annotate"),
    "cell-description": ("CellDescriptionPipeline", "describe"),
    "text-to-cell": ("TextToCellPipeline", "generate_cells"),
}
# options of the cell input a pipeline call may set (which AnnData matrix, which gene column, normalisation)
CELL_KWARGS = ("use_raw", "layer", "gene_column", "normalize")
# files a folder's remote-code pipelines import (relative imports of this file and of the jobs)
PIPELINE_CODE = ("pipeline_scmmgpt.py", "jobs_scmmgpt.py", "kinds_scmmgpt.py", "pseudocells_scmmgpt.py",
                 "results_scmmgpt.py", "inputs_scmmgpt.py", "ontology_scmmgpt.py", "processing_scmmgpt.py")


# ---------------------------------------------------------------------------------------------------- pipelines
class ScMMGPTAutoModel:
    """The model class a pipeline loads from a folder name: the one its kind names (`jobs_scmmgpt.MODEL_KINDS`), so
    that a stage-2 model is never built around stage-1 weights (which would give the LLM random weights)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            hub = {k: kwargs[k] for k in ("trust_remote_code", "revision", "token") if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        auto = getattr(transformers, model_kind(config).auto_class)
        return auto.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)


class ScMMGPTPipeline(Pipeline):
    """Shared parts: the jobs of the model (`ScMMGPTJobs`), cell-input options, batch size, JSON-ready outputs. One
    call handles all the cells (or texts) it is given, `batch_size` at a time."""

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False
    default_batch_size = 32
    job = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kind = kind_of_model(self.model)
        processor = self.processor
        if processor is None and kind.name in ("classifier", "encoder"):
            processor = self.feature_extractor
        if processor is None and getattr(self.model, "name_or_path", None):
            # a classifier folder holds a cell tokenizer, not a processor
            processor = transformers.AutoFeatureExtractor.from_pretrained(self.model.name_or_path)
        if processor is None:
            raise ValueError(f"the {self.task or type(self).__name__} pipeline needs the model's ScMMGPTProcessor: "
                             "pass processor=..., or load from a folder that holds processor_config.json")
        label_texts = read_label_texts(self.model.name_or_path) if getattr(self.model, "name_or_path", "") else None
        self.jobs = ScMMGPTJobs(self.model, processor, label_texts, progress=False, verbose=False)
        if self.job not in kind.jobs:
            raise ValueError(f"the {self.task} pipeline needs a model that does {self.job}; this {kind.name} model "
                             f"does: {', '.join(kind.jobs)}")

    def __call__(self, inputs, batch_size: int | None = None, **kwargs):
        if batch_size is None:
            batch_size = self._batch_size if self._batch_size is not None else self.default_batch_size
        batch_size = check_positive_int(batch_size, "batch_size")
        preprocess, forward, postprocess = self._sanitize_parameters(**kwargs)
        preprocess = {**self._preprocess_params, **preprocess}
        forward = {**self._forward_params, **forward, "batch_size": batch_size}
        postprocess = {**self._postprocess_params, **postprocess}
        return self.run_single(inputs, preprocess, forward, postprocess)

    @staticmethod
    def _split_cell_kwargs(kwargs: dict, gene_names=None) -> dict:
        preprocess = {k: kwargs.pop(k) for k in CELL_KWARGS if k in kwargs}
        if gene_names is not None:
            preprocess["gene_names"] = gene_names
        return preprocess

    def preprocess(self, inputs, gene_names=None, **cell_kwargs):
        cells = self.jobs.read(inputs, gene_names, **cell_kwargs)
        return {"cells": cells, "cell_ids": cells.cell_ids}

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the model, the processor and all the pipelines that apply to it (not only this one, as
        `Pipeline.save_pretrained` would)."""
        self.model.save_pretrained(save_directory, **kwargs)
        self.jobs.processor.save_pretrained(save_directory)
        save_pipelines(save_directory, getattr(self.model, "name_or_path", None))


def _check_unknown(kwargs: dict, task: str):
    if kwargs:
        raise TypeError(f"unknown {task} parameters: {sorted(kwargs)}")


class CellAnnotationPipeline(ScMMGPTPipeline):
    """`cell-annotation`: a label for each cell.

    Parameters: `labels` (alias `candidate_labels`; default the cell types the model was trained on; Cell Ontology
    names and CL ids work too, see `ScMMGPTJobs.annotate`), `method` (`"retrieval"` zero-shot cell–text similarity,
    stage 1 and 2; `"likelihood"` or `"generate"`, stage 2; a fine-tuned classifier uses its head), `label_texts`
    (a list of one text per label, or a dict label → text), `top_k` (ranked labels listed per cell, default 3),
    `gene_names` (matrix inputs), cell input options (`use_raw`, `layer`, `gene_column`, `normalize`), `batch_size`.

    Returns one dict per cell: `{"cell", "label", "score", "top_labels": [{"label", "score"}, ...]}`; scores are the
    method's (cosine similarity, mean token log-probability, 1 for the generated label, or a class probability). A
    cell with no known gene expressed gets `label: None`, `score: None` and no `top_labels`.
    """

    job = "annotate"

    def _sanitize_parameters(self, labels=None, candidate_labels=None, method=None, label_texts=None, top_k=None,
                             gene_names=None, **kwargs):
        preprocess = self._split_cell_kwargs(kwargs, gene_names)
        _check_unknown(kwargs, "cell-annotation")
        labels = labels if labels is not None else candidate_labels
        forward = {k: v for k, v in (("labels", labels), ("method", method), ("label_texts", label_texts)) if v is not None}
        postprocess = {}
        if top_k is not None:
            postprocess["top_k"] = check_positive_int(top_k, "top_k")
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, batch_size=32, **job_kwargs):
        result = self.jobs.annotate(model_inputs["cells"], batch_size=batch_size, **job_kwargs)
        return {"cell_ids": model_inputs["cell_ids"], "result": result}

    def postprocess(self, model_outputs, top_k: int = 3):
        result = model_outputs["result"]
        scores = np.asarray(result.scores, dtype=np.float64)
        order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, : min(top_k, scores.shape[1])]
        out = []
        for i, cell in enumerate(model_outputs["cell_ids"]):
            label = result.predictions[i]
            best = None if label is None else float(scores[i, result.labels.index(label)])
            top = [] if label is None else [{"label": result.labels[j], "score": float(scores[i, j])} for j in order[i]]
            out.append({"cell": cell, "label": label, "score": best, "top_labels": top})
        return out


class CellDescriptionPipeline(ScMMGPTPipeline):
    """`cell-description`: a written description of each cell (stage-2 model).

    Parameters: `prompt` (must contain one `<cell>`; default the training prompt), `max_new_tokens` (default: long
    enough for the model's longest label text), `generate_kwargs` (any `generate` argument; greedy by default),
    `gene_names`, cell input options, `batch_size`.

    Returns one dict per cell: `{"cell", "generated_text"}`.
    """

    job = "describe"

    def _sanitize_parameters(self, prompt=None, max_new_tokens=None, generate_kwargs=None, gene_names=None, **kwargs):
        preprocess = self._split_cell_kwargs(kwargs, gene_names)
        _check_unknown(kwargs, "cell-description")
        forward = {k: v for k, v in (("prompt", prompt), ("max_new_tokens", max_new_tokens),
                                     ("generate_kwargs", generate_kwargs)) if v is not None}
        return preprocess, forward, {}

    def _forward(self, model_inputs, batch_size=32, **job_kwargs):
        texts = self.jobs.describe(model_inputs["cells"], batch_size=batch_size, **job_kwargs)
        return {"cell_ids": model_inputs["cell_ids"], "texts": texts}

    def postprocess(self, model_outputs):
        return [{"cell": c, "generated_text": t} for c, t in zip(model_outputs["cell_ids"], model_outputs["texts"])]


class TextToCellPipeline(ScMMGPTPipeline):
    """`text-to-cell`: pseudo-cells from text prompts (stage-2 model).

    Input: a text or a list of texts. Parameters: `n_per_text` (cells per text, default 1), `genes` (genes to decode,
    default the whole vocabulary), `seed`, `output` (`"counts"`, `"log1p"` or `"mean"`; default: log1p draws of a
    count decoder, the mean of an MSE one), `library_size`, `state_spread`, `noise_scale`, `return_anndata`,
    `batch_size` (see `ScMMGPTJobs.generate_cells`).

    Returns `{"gene_names": [...], "output": kind, "cells": [{"text", "expression": [one value per gene]}, ...]}` (one
    cell per text and draw), or an AnnData with `return_anndata=True`.
    """

    job = "generate_cells"

    def _sanitize_parameters(self, n_per_text=None, genes=None, seed=None, noise_scale=None, output=None,
                             library_size=None, state_spread=None, return_anndata=None, **kwargs):
        _check_unknown(kwargs, "text-to-cell")
        forward = {k: v for k, v in (("n_per_text", n_per_text), ("genes", genes), ("seed", seed),
                                     ("noise_scale", noise_scale), ("output", output),
                                     ("library_size", library_size), ("state_spread", state_spread))
                   if v is not None}
        postprocess = {} if return_anndata is None else {"return_anndata": bool(return_anndata)}
        return {}, forward, postprocess

    def preprocess(self, inputs):
        return {"texts": inputs}

    def _forward(self, model_inputs, batch_size=32, **job_kwargs):
        return {"generated": self.jobs.generate_cells(model_inputs["texts"], batch_size=batch_size, **job_kwargs)}

    def postprocess(self, model_outputs, return_anndata: bool = False):
        generated = model_outputs["generated"]
        if return_anndata:
            return generated.to_anndata()
        expression = np.asarray(generated.expression, dtype=np.float64)
        return {
            "gene_names": list(generated.gene_names),
            "output": generated.output,
            "cells": [{"text": t, "expression": row.tolist()} for t, row in zip(generated.texts, expression)],
        }


# ---------------------------------------------------------------------------------------------------- saving
def pipelines_for_config(config: dict) -> dict:
    """The `custom_pipelines` entry for a model folder's `config.json`: the tasks whose job the folder's kind can
    do, each loaded with the kind's auto class ({} for folders that are not scMMGPT's)."""
    try:
        kind = model_kind(config)
    except ValueError:
        return {}
    module = os.path.splitext(os.path.basename(__file__))[0]
    return {task: {"impl": f"{module}.{name}", "pt": [kind.auto_class], "type": "multimodal"}
            for task, (name, job) in PIPELINE_TASKS.items() if job in kind.jobs}


def save_pipelines(model_dir, source=None) -> dict:
    """Make a saved scMMGPT folder carry its pipelines: copy this file and the files it imports in, with the Cell
    Ontology they read annotate labels from (`cell_ontology.json.gz`; remote code run from `source`, a folder or Hub
    id, takes that folder's copy), and write `custom_pipelines` into `config.json` (rewritten atomically). Returns the
    `custom_pipelines` written ({} for folders without pipelines)."""
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    custom = pipelines_for_config(config)
    if not custom:
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    for name in PIPELINE_CODE:
        target = os.path.join(model_dir, name)
        if os.path.abspath(target) != os.path.join(here, name):
            shutil.copyfile(os.path.join(here, name), target)
    ontology = shipped_ontology_file(source)
    target = os.path.join(model_dir, ONTOLOGY_FILE)
    if ontology is not None and os.path.abspath(target) != os.path.abspath(ontology):
        shutil.copyfile(ontology, target)
    config["custom_pipelines"] = custom
    tmp = config_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)
    return custom


def register_pipelines() -> None:
    """Register the three tasks with transformers' `PIPELINE_REGISTRY` (idempotent), so that
    `pipeline("cell-annotation", model=model, processor=processor)` works in a process that imported scMMGPT."""
    for task, (class_name, _) in PIPELINE_TASKS.items():
        pipeline_class = globals()[class_name]
        registered = PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl")
        if registered is not None and registered.__name__ == class_name:
            pipeline_class._registered_impl = {task: PIPELINE_REGISTRY.supported_tasks[task]}
            continue
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=ScMMGPTAutoModel,
                                            type="multimodal")


register_pipelines()

__all__ = [
    "CellAnnotationPipeline",
    "CellDescriptionPipeline",
    "TextToCellPipeline",
    "ScMMGPTPipeline",
    "pipelines_for_config",
    "register_pipelines",
    "save_pipelines",
]
