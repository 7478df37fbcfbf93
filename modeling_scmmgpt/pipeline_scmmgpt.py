"""transformers pipelines for the three jobs of scMMGPT: `cell-annotation`, `cell-description`, `text-to-cell`.

    from transformers import pipeline
    annotate = pipeline("cell-annotation", model="org/scmmgpt", trust_remote_code=True)
    annotate("pbmc.h5ad", labels=["CD14+ Monocyte", "CD19+ B"], use_raw=True, batch_size=32)
    # → [{"cell": "AAAC…-1", "label": "CD14+ Monocyte", "score": 0.71, "top_labels": [...]}, ...]

Cell inputs: an `anndata.AnnData`, a path to an `.h5ad` file, a dict of gene → count (one cell), a list of such dicts
(one per cell), `{"genes": [...], "counts": [[...], ...]}` (cells × genes, the Inference Endpoints payload), or a
numpy / scipy.sparse matrix with `gene_names=`. One call takes all the cells and returns one result per cell;
`batch_size` is the number of cells (or texts) per forward pass. Outputs are plain lists / dicts / numbers / strings
(JSON-serialisable); `text-to-cell` can return an AnnData with `return_anndata=True`.

A model folder carries these pipelines as remote code: `save_pipelines(folder)` copies this file into it and lists the
tasks in `config.json` (`custom_pipelines`), so `pipeline(task, model=folder, trust_remote_code=True)` works where this
package is not installed. This file imports nothing relatively and keeps `anndata` optional (imported by name, only for
`.h5ad` paths), as transformers' remote-code import check requires.
"""

import importlib
import json
import math
import os
import shutil

import numpy as np
from scipy import sparse
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

STAGE2_ARCHITECTURE = "ScMMGPTForConditionalGeneration"
STAGE1_ARCHITECTURE = "ScMMGPTModel"
# task → (pipeline class name, whether it needs the stage-2 model's LLM)
PIPELINE_TASKS = {
    "cell-annotation": ("CellAnnotationPipeline", False),
    "cell-description": ("CellDescriptionPipeline", True),
    "text-to-cell": ("TextToCellPipeline", True),
}
# options of the cell tokenizer a pipeline call may set (which AnnData matrix, normalisation, genes per cell)
CELL_KWARGS = ("use_raw", "layer", "gene_column", "normalize", "max_genes")


# ---------------------------------------------------------------------------------------------------- cell inputs
def _is_anndata(obj) -> bool:
    return type(obj).__name__ in ("AnnData", "AnnDataView") or (hasattr(obj, "obs_names") and hasattr(obj, "var_names"))


def _read_h5ad(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .h5ad file at {path!r}")
    try:
        anndata = importlib.import_module("anndata")
    except ImportError as error:
        raise ImportError(f"reading {path!r} needs the `anndata` package: pip install anndata") from error
    return anndata.read_h5ad(path)


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where} is {value}: counts must be finite")
    if value < 0:
        raise ValueError(f"{where} is {value}: counts must be non-negative")
    return value


def _matrix_from_gene_dicts(cells: list) -> tuple[sparse.csr_matrix, list[str]]:
    """Cells given as {gene: count} dicts → (cells × genes CSR, gene names in first-seen order)."""
    index: dict[str, int] = {}
    rows, cols, values = [], [], []
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict):
            raise TypeError(f"cell {i} is a {type(cell).__name__}; give every cell as a dict of gene → count")
        if not cell:
            raise ValueError(f"cell {i} has no genes")
        for gene, count in cell.items():
            if not isinstance(gene, str) or not gene:
                raise TypeError(f"cell {i}: gene names must be non-empty strings, got {gene!r}")
            rows.append(i)
            cols.append(index.setdefault(gene, len(index)))
            values.append(_number(count, f"cell {i}, gene {gene!r}"))
    matrix = sparse.csr_matrix((np.asarray(values, np.float32), (rows, cols)), shape=(len(cells), len(index)))
    return matrix, list(index)


def _matrix_from_payload(payload: dict) -> tuple[np.ndarray, list[str], list[str] | None]:
    """`{"genes": [...], "counts": [[...]], "cell_ids": [...]}` → (cells × genes float32, genes, cell ids or None)."""
    genes, counts, cell_ids = payload.get("genes"), payload.get("counts"), payload.get("cell_ids")
    if not isinstance(genes, (list, tuple)) or not genes or not all(isinstance(g, str) and g for g in genes):
        raise TypeError('"genes" must be a non-empty list of gene names (strings)')
    if len(set(genes)) != len(genes):
        duplicated = sorted({g for g in genes if genes.count(g) > 1})
        raise ValueError(f'"genes" has duplicated names: {duplicated[:10]}')
    if isinstance(counts, (list, tuple)) and counts and not isinstance(counts[0], (list, tuple, np.ndarray)):
        counts = [counts]  # one cell given as a flat list
    if not isinstance(counts, (list, tuple, np.ndarray)) or len(counts) == 0:
        raise TypeError('"counts" must be a non-empty list of cells, each a list of one count per gene')
    for i, row in enumerate(counts):
        if not isinstance(row, (list, tuple, np.ndarray)):
            raise TypeError(f'"counts"[{i}] must be a list of numbers, got {type(row).__name__}')
        if len(row) != len(genes):
            raise ValueError(f'"counts"[{i}] has {len(row)} values but "genes" has {len(genes)} names')
    matrix = np.asarray(counts)
    if matrix.dtype.kind not in "iuf":  # strings, booleans, None, nested lists: find the first bad value to name it
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                    raise TypeError(f'"counts"[{i}][{j}] (gene {genes[j]!r}) must be a number, got {value!r}')
        raise TypeError(f'"counts" must hold numbers, got values of type {matrix.dtype}')
    matrix = matrix.astype(np.float32)
    if not np.isfinite(matrix).all():
        i, j = np.argwhere(~np.isfinite(matrix))[0]
        raise ValueError(f'"counts"[{i}][{j}] (gene {genes[j]!r}) is not finite')
    if (matrix < 0).any():
        i, j = np.argwhere(matrix < 0)[0]
        raise ValueError(f'"counts"[{i}][{j}] (gene {genes[j]!r}) is negative; give counts or log-normalised values')
    if cell_ids is not None:
        if not isinstance(cell_ids, (list, tuple)) or len(cell_ids) != len(matrix):
            raise ValueError(f'"cell_ids" must be a list of {len(matrix)} names, one per row of "counts"')
        cell_ids = [str(c) for c in cell_ids]
    return matrix, list(genes), cell_ids


def load_cells(inputs, gene_names=None):
    """Any accepted cell input → (cells for the model's jobs, gene names or None, cell ids).

    Accepted: AnnData; a path to an `.h5ad`; `{gene: count}` (one cell); a list of such dicts; `{"genes": [...],
    "counts": [[...]]}`; a numpy / scipy.sparse matrix (cells × genes) with `gene_names`.
    """
    if isinstance(inputs, os.PathLike):
        inputs = os.fspath(inputs)
    if isinstance(inputs, str):
        if not inputs.endswith(".h5ad"):
            raise ValueError(f"a string input must be the path of an .h5ad file, got {inputs!r}")
        inputs = _read_h5ad(inputs)
    if _is_anndata(inputs):
        return inputs, gene_names, [str(c) for c in inputs.obs_names]
    if isinstance(inputs, dict):
        if "genes" in inputs or "counts" in inputs:
            matrix, genes, cell_ids = _matrix_from_payload(inputs)
        else:
            matrix, genes = _matrix_from_gene_dicts([inputs])
            cell_ids = None
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(c, dict) for c in inputs):
        matrix, genes = _matrix_from_gene_dicts(list(inputs))
        cell_ids = None
    elif isinstance(inputs, np.ndarray) or sparse.issparse(inputs):
        if gene_names is None:
            raise ValueError("a matrix input needs gene_names=[...], the gene of each column")
        matrix, genes, cell_ids = inputs, [str(g) for g in gene_names], None
        if matrix.ndim != 2:
            raise ValueError(f"a matrix input must be 2-D (cells × genes), got shape {matrix.shape}")
    else:
        raise TypeError(
            f"cannot read cells from a {type(inputs).__name__}: give an AnnData, a path to an .h5ad file, a dict of "
            'gene → count, a list of such dicts, {"genes": [...], "counts": [[...]]}, or a matrix with gene_names'
        )
    return matrix, genes, cell_ids or [f"cell_{i}" for i in range(matrix.shape[0])]


# ---------------------------------------------------------------------------------------------------- pipelines
class ScMMGPTAutoModel:
    """The model class a pipeline loads from a folder name: the stage-2 model where the folder holds one
    (`AutoModelForCausalLM`), else the stage-1 model (`AutoModel`). Never builds a stage-2 model around stage-1
    weights, which would give the LLM random weights."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            hub = {k: kwargs[k] for k in ("trust_remote_code", "revision", "token") if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        auto = AutoModelForCausalLM if STAGE2_ARCHITECTURE in (config.architectures or []) else AutoModel
        return auto.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)


class ScMMGPTPipeline(Pipeline):
    """Shared parts: the processor, cell-input parsing, batch size, JSON-ready outputs. One call handles all the cells
    (or texts) it is given, `batch_size` at a time, through the model's job methods."""

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False
    default_batch_size = 32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            self.processor = getattr(self.model, "processor", None)
        if self.processor is None:
            raise ValueError(f"the {self.task or type(self).__name__} pipeline needs the model's ScMMGPTProcessor: "
                             "pass processor=..., or load from a folder that holds processor_config.json")

    def __call__(self, inputs, batch_size: int | None = None, **kwargs):
        if batch_size is None:
            batch_size = self._batch_size if self._batch_size is not None else self.default_batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        preprocess, forward, postprocess = self._sanitize_parameters(**kwargs)
        preprocess = {**self._preprocess_params, **preprocess}
        forward = {**self._forward_params, **forward, "batch_size": batch_size}
        postprocess = {**self._postprocess_params, **postprocess}
        return self.run_single(inputs, preprocess, forward, postprocess)

    @staticmethod
    def _split_cell_kwargs(kwargs: dict) -> dict:
        return {k: kwargs.pop(k) for k in CELL_KWARGS if k in kwargs}

    def _cell_inputs(self, inputs, gene_names=None, **cell_kwargs) -> dict:
        cells, genes, cell_ids = load_cells(inputs, gene_names)
        return {"cells": cells, "gene_names": genes, "cell_ids": cell_ids, "cell_kwargs": cell_kwargs}

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the model, the processor and all the pipelines that apply to it (not only this one, as
        `Pipeline.save_pretrained` would)."""
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)
        save_pipelines(save_directory)


class CellAnnotationPipeline(ScMMGPTPipeline):
    """`cell-annotation`: a label from `labels` for each cell.

    Parameters: `labels` (required; alias `candidate_labels`), `method` (`"retrieval"` zero-shot cell–text similarity,
    stage 1 and 2; `"likelihood"` or `"generate"`, stage 2), `label_texts` (texts matched against cells in retrieval,
    default `"cell type: {label}."`), `top_k` (ranked labels listed per cell, default 3), `gene_names` (matrix inputs),
    cell tokenizer options (`use_raw`, `layer`, `gene_column`, `normalize`, `max_genes`), `batch_size`.

    Returns one dict per cell: `{"cell", "label", "score", "top_labels": [{"label", "score"}, ...]}`; scores are the
    method's (cosine similarity, mean token log-probability, or 1 for the generated label).
    """

    def _sanitize_parameters(self, labels=None, candidate_labels=None, method=None, label_texts=None, top_k=None,
                             gene_names=None, **kwargs):
        preprocess = self._split_cell_kwargs(kwargs)
        if kwargs:
            raise TypeError(f"unknown cell-annotation parameters: {sorted(kwargs)}")
        if gene_names is not None:
            preprocess["gene_names"] = gene_names
        forward, postprocess = {}, {}
        labels = labels if labels is not None else candidate_labels
        if labels is not None:
            forward["labels"] = [labels] if isinstance(labels, str) else list(labels)
        if method is not None:
            forward["method"] = method
        if label_texts is not None:
            forward["label_texts"] = list(label_texts)
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
            postprocess["top_k"] = top_k
        return preprocess, forward, postprocess

    def preprocess(self, inputs, gene_names=None, **cell_kwargs):
        return self._cell_inputs(inputs, gene_names, **cell_kwargs)

    def _forward(self, model_inputs, labels=None, method="retrieval", label_texts=None, batch_size=32):
        if not labels:
            raise ValueError("cell-annotation needs labels=[...], the candidate cell types")
        result = self.model.annotate(
            model_inputs["cells"], labels, method=method, label_texts=label_texts,
            gene_names=model_inputs["gene_names"], processor=self.processor, batch_size=batch_size,
            **model_inputs["cell_kwargs"],
        )
        return {"cell_ids": model_inputs["cell_ids"], "result": result}

    def postprocess(self, model_outputs, top_k: int = 3):
        result = model_outputs["result"]
        scores = np.asarray(result.scores, dtype=np.float64)
        order = np.argsort(-scores, axis=1, kind="stable")[:, : min(top_k, scores.shape[1])]
        out = []
        for i, cell in enumerate(model_outputs["cell_ids"]):
            best = result.labels.index(result.predictions[i])
            out.append({
                "cell": cell,
                "label": result.predictions[i],
                "score": float(scores[i, best]),
                "top_labels": [{"label": result.labels[j], "score": float(scores[i, j])} for j in order[i]],
            })
        return out


class CellDescriptionPipeline(ScMMGPTPipeline):
    """`cell-description`: a written description of each cell (stage-2 model).

    Parameters: `prompt` (must contain one `<cell>`; default the training prompt), `max_new_tokens` (default 64),
    `generate_kwargs` (any `generate` argument; greedy by default), `gene_names`, cell tokenizer options, `batch_size`.

    Returns one dict per cell: `{"cell", "generated_text"}`.
    """

    def _sanitize_parameters(self, prompt=None, max_new_tokens=None, generate_kwargs=None, gene_names=None, **kwargs):
        preprocess = self._split_cell_kwargs(kwargs)
        if kwargs:
            raise TypeError(f"unknown cell-description parameters: {sorted(kwargs)}")
        if gene_names is not None:
            preprocess["gene_names"] = gene_names
        forward = {}
        if prompt is not None:
            forward["prompt"] = prompt
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
            forward["max_new_tokens"] = max_new_tokens
        if generate_kwargs is not None:
            forward["generate_kwargs"] = dict(generate_kwargs)
        return preprocess, forward, {}

    def preprocess(self, inputs, gene_names=None, **cell_kwargs):
        return self._cell_inputs(inputs, gene_names, **cell_kwargs)

    def _forward(self, model_inputs, prompt=None, max_new_tokens=64, generate_kwargs=None, batch_size=32):
        texts = self.model.describe(
            model_inputs["cells"], prompt=prompt, gene_names=model_inputs["gene_names"], processor=self.processor,
            batch_size=batch_size, max_new_tokens=max_new_tokens, cell_kwargs=model_inputs["cell_kwargs"],
            **(generate_kwargs or {}),
        )
        return {"cell_ids": model_inputs["cell_ids"], "texts": texts}

    def postprocess(self, model_outputs):
        return [{"cell": c, "generated_text": t} for c, t in zip(model_outputs["cell_ids"], model_outputs["texts"])]


class TextToCellPipeline(ScMMGPTPipeline):
    """`text-to-cell`: pseudo-cells (log1p expression) from text prompts (stage-2 model).

    Input: a text or a list of texts. Parameters: `n_per_text` (cells per text, default 1), `genes` (genes to decode,
    default the whole vocabulary), `seed` (draws beyond a text's first), `noise_scale`, `return_anndata`, `batch_size`.

    Returns `{"gene_names": [...], "cells": [{"text", "expression": [one value per gene]}, ...]}` (one cell per text and
    draw), or an AnnData with `return_anndata=True`.
    """

    def _sanitize_parameters(self, n_per_text=None, genes=None, seed=None, noise_scale=None, return_anndata=None,
                             **kwargs):
        if kwargs:
            raise TypeError(f"unknown text-to-cell parameters: {sorted(kwargs)}")
        forward = {}
        if n_per_text is not None:
            if isinstance(n_per_text, bool) or not isinstance(n_per_text, int) or n_per_text < 1:
                raise ValueError(f"n_per_text must be a positive integer, got {n_per_text!r}")
            forward["n_per_text"] = n_per_text
        if genes is not None:
            forward["genes"] = [str(g) for g in genes]
        if seed is not None:
            forward["seed"] = int(seed)
        if noise_scale is not None:
            forward["noise_scale"] = float(noise_scale)
        postprocess = {} if return_anndata is None else {"return_anndata": bool(return_anndata)}
        return {}, forward, postprocess

    def preprocess(self, inputs):
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise TypeError("text-to-cell takes a text or a non-empty list of non-empty texts")
        return {"texts": list(texts)}

    def _forward(self, model_inputs, n_per_text=1, genes=None, seed=None, noise_scale=0.1, batch_size=32):
        return {"generated": self.model.generate_cells(
            model_inputs["texts"], n_per_text=n_per_text, genes=genes, seed=seed, noise_scale=noise_scale,
            processor=self.processor, batch_size=batch_size,
        )}

    def postprocess(self, model_outputs, return_anndata: bool = False):
        generated = model_outputs["generated"]
        if return_anndata:
            return generated.to_anndata()
        expression = np.asarray(generated.expression, dtype=np.float64)
        return {
            "gene_names": list(generated.gene_names),
            "cells": [{"text": t, "expression": row.tolist()} for t, row in zip(generated.texts, expression)],
        }


# ---------------------------------------------------------------------------------------------------- saving
def pipelines_for_config(config: dict) -> dict:
    """The `custom_pipelines` entry for a model folder's `config.json`: all three tasks for a stage-2 model (loaded
    with `AutoModelForCausalLM`), `cell-annotation` only for a stage-1 model (`AutoModel`), none otherwise."""
    architectures = config.get("architectures") or []
    if STAGE2_ARCHITECTURE in architectures:
        auto, tasks = "AutoModelForCausalLM", list(PIPELINE_TASKS)
    elif STAGE1_ARCHITECTURE in architectures:
        auto, tasks = "AutoModel", [t for t, (_, needs_llm) in PIPELINE_TASKS.items() if not needs_llm]
    else:
        return {}
    module = os.path.splitext(os.path.basename(__file__))[0]
    return {task: {"impl": f"{module}.{PIPELINE_TASKS[task][0]}", "pt": [auto], "type": "multimodal"}
            for task in tasks}


def save_pipelines(model_dir) -> dict:
    """Make a saved scMMGPT folder carry its pipelines: copy this file in and write `custom_pipelines` into
    `config.json` (rewritten atomically). Returns the `custom_pipelines` written ({} for folders without pipelines)."""
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    custom = pipelines_for_config(config)
    if not custom:
        return {}
    target = os.path.join(model_dir, os.path.basename(__file__))
    if os.path.abspath(target) != os.path.abspath(__file__):
        shutil.copyfile(__file__, target)
    config["custom_pipelines"] = custom
    tmp = config_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)
    return custom


def register_pipelines() -> None:
    """Register the three tasks with transformers' `PIPELINE_REGISTRY` (idempotent), so that
    `pipeline("cell-annotation", model=model, processor=processor)` works in a process that imported scMMGPT."""
    models = {"cell-annotation": ScMMGPTAutoModel, "cell-description": AutoModelForCausalLM,
              "text-to-cell": AutoModelForCausalLM}
    for task, (class_name, _) in PIPELINE_TASKS.items():
        pipeline_class = globals()[class_name]
        registered = PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl")
        if registered is not None and registered.__name__ == class_name:
            pipeline_class._registered_impl = {task: PIPELINE_REGISTRY.supported_tasks[task]}
            continue
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=models[task],
                                            type="multimodal")


register_pipelines()

__all__ = [
    "CellAnnotationPipeline",
    "CellDescriptionPipeline",
    "TextToCellPipeline",
    "ScMMGPTPipeline",
    "load_cells",
    "pipelines_for_config",
    "register_pipelines",
    "save_pipelines",
]
