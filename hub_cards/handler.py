"""Inference Endpoints handler for scMMGPT (a custom handler: `handler.py` at the root of the model repository).

Requests (JSON):

    {"inputs": {"genes": ["LYZ", "MS4A1", ...], "counts": [[40, 0, ...], ...], "cell_ids": [...]},   # cells × genes
     "task": "annotate" | "describe" | "generate",
     "parameters": {...}}

- `annotate`: `parameters.labels` (required), `method` (`retrieval` | `likelihood` | `generate`), `label_texts`,
  `top_k`, `batch_size`, `normalize`, `max_genes` → one `{"cell", "label", "score", "top_labels"}` per cell;
- `describe`: `max_new_tokens`, `prompt`, `do_sample`, `temperature`, `top_p`, `num_beams`, `repetition_penalty`,
  `batch_size`, ... → one `{"cell", "generated_text"}` per cell;
- `generate`: `inputs` is `{"texts": [...]}` (or a text, or a list of texts); `n_per_text`, `seed`, `genes`,
  `noise_scale`, `batch_size` → `{"gene_names": [...], "cells": [{"text", "expression"}, ...]}`.

A request that is malformed, too large or refused by the model gets `{"error": "..."}` naming the problem; the handler
never raises on a request. The model code comes from the repository itself (`trust_remote_code`), so the endpoint
needs only `requirements.txt`, not the scMMGPT package.
"""

import json
import logging
import math
import os
import warnings

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

logger = logging.getLogger(__name__)

TASKS = {"annotate": "cell-annotation", "describe": "cell-description", "generate": "text-to-cell"}
# request size limits: an endpoint answers requests, bulk jobs belong in a batch job
MAX_CELLS = int(os.environ.get("SCMMGPT_MAX_CELLS", 2048))
MAX_GENES = int(os.environ.get("SCMMGPT_MAX_GENES", 60_000))
MAX_VALUES = int(os.environ.get("SCMMGPT_MAX_VALUES", 20_000_000))
MAX_TEXTS = 256
MAX_TEXT_CHARS = 4000
MAX_LABELS = 1000
MAX_NEW_TOKENS = 512
MAX_PER_TEXT = 100
MAX_BATCH_SIZE = 1024


class RequestError(ValueError):
    """A request the handler refuses; its message goes back to the caller."""


# ---------------------------------------------------------------------------------------------------- validation
def _int(params, name, low, high, default=None):
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"parameters.{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _float(params, name, low, high):
    value = params.get(name)
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"parameters.{name} must be a number from {low} to {high}, got {value!r}")
    return float(value)


def _bool(params, name):
    value = params.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"parameters.{name} must be true or false, got {value!r}")
    return value


def _strings(value, what, max_items, distinct=False):
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise RequestError(f"{what} must be a non-empty list of non-empty strings")
    if len(value) > max_items:
        raise RequestError(f"{what} has {len(value)} entries; at most {max_items} per request")
    if distinct and len(set(value)) != len(value):
        duplicated = sorted({v for v in value if value.count(v) > 1})
        raise RequestError(f"{what} has duplicates: {duplicated[:10]}")
    return value


def _check_unknown(params, allowed, task):
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise RequestError(f"unknown parameters for task {task!r}: {unknown}; allowed: {sorted(allowed)}")


def validate_cells(inputs) -> dict:
    """`{"genes": [...], "counts": [[...]], "cell_ids": [...]}` checked for types, shapes, values and size."""
    if not isinstance(inputs, dict):
        raise RequestError('"inputs" must be an object {"genes": [...], "counts": [[...], ...]} for this task')
    unknown = sorted(set(inputs) - {"genes", "counts", "cell_ids"})
    if unknown:
        raise RequestError(f'"inputs" has unknown keys {unknown}; expected "genes", "counts" and optionally "cell_ids"')
    genes = _strings(inputs.get("genes"), '"inputs.genes"', MAX_GENES, distinct=True)
    counts = inputs.get("counts")
    if not isinstance(counts, list) or not counts or not all(isinstance(row, list) for row in counts):
        raise RequestError('"inputs.counts" must be a non-empty list of cells, each a list of one count per gene')
    if len(counts) > MAX_CELLS:
        raise RequestError(f'"inputs.counts" has {len(counts)} cells; at most {MAX_CELLS} per request')
    if len(counts) * len(genes) > MAX_VALUES:
        raise RequestError(f"{len(counts)} cells × {len(genes)} genes is over the limit of {MAX_VALUES} values")
    for i, row in enumerate(counts):
        if len(row) != len(genes):
            raise RequestError(f'"inputs.counts"[{i}] has {len(row)} values but "inputs.genes" has {len(genes)}')
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f'"inputs.counts"[{i}][{j}] (gene {genes[j]}) must be a number, got {value!r}')
            if not math.isfinite(value) or value < 0:
                raise RequestError(f'"inputs.counts"[{i}][{j}] (gene {genes[j]}) is {value}; counts must be finite '
                                   "and non-negative")
    cells = {"genes": genes, "counts": counts}
    if inputs.get("cell_ids") is not None:
        ids = inputs["cell_ids"]
        if not isinstance(ids, list) or len(ids) != len(counts) or not all(isinstance(c, (str, int)) for c in ids):
            raise RequestError(f'"inputs.cell_ids" must be a list of {len(counts)} names, one per cell')
        cells["cell_ids"] = [str(c) for c in ids]
    return cells


def validate_texts(inputs) -> list:
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - {"texts", "text"})
        if unknown:
            raise RequestError(f'"inputs" has unknown keys {unknown}; expected "texts"')
        inputs = inputs.get("texts", inputs.get("text"))
    if isinstance(inputs, str):
        inputs = [inputs]
    texts = _strings(inputs, '"inputs.texts"', MAX_TEXTS)
    long = [i for i, t in enumerate(texts) if len(t) > MAX_TEXT_CHARS]
    if long:
        raise RequestError(f"texts {long[:5]} are longer than {MAX_TEXT_CHARS} characters")
    return texts


CELL_OPTIONS = ("batch_size", "normalize", "max_genes")


def _cell_options(params) -> dict:
    options = {
        "batch_size": _int(params, "batch_size", 1, MAX_BATCH_SIZE),
        "normalize": _bool(params, "normalize"),
        "max_genes": _int(params, "max_genes", 1, MAX_GENES),
    }
    return {k: v for k, v in options.items() if v is not None}


def validate_request(data) -> tuple[str, object, dict]:
    """A request (dict, or JSON text / bytes) → (task, pipeline input, pipeline keyword arguments)."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8", errors="replace")
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise RequestError(f"the request is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"inputs", "task", "parameters"})
    if unknown:
        raise RequestError(f"unknown request keys {unknown}; expected \"inputs\", \"task\", \"parameters\"")
    task = data.get("task", "annotate")
    if task not in TASKS:
        raise RequestError(f'"task" must be one of {sorted(TASKS)}, got {task!r}')
    if "inputs" not in data:
        raise RequestError('the request has no "inputs"')
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError('"parameters" must be an object')

    if task == "annotate":
        _check_unknown(params, ("labels", "method", "label_texts", "top_k") + CELL_OPTIONS, task)
        if "labels" not in params:
            raise RequestError('task "annotate" needs parameters.labels, the candidate cell types')
        kwargs = {"labels": _strings(params["labels"], "parameters.labels", MAX_LABELS, distinct=True),
                  **_cell_options(params)}
        method = params.get("method", "retrieval")
        if method not in ("retrieval", "likelihood", "generate"):
            raise RequestError(f"parameters.method must be retrieval, likelihood or generate, got {method!r}")
        kwargs["method"] = method
        if params.get("label_texts") is not None:
            kwargs["label_texts"] = _strings(params["label_texts"], "parameters.label_texts", MAX_LABELS)
            if len(kwargs["label_texts"]) != len(kwargs["labels"]):
                raise RequestError("parameters.label_texts must have one text per label")
        top_k = _int(params, "top_k", 1, MAX_LABELS)
        if top_k is not None:
            kwargs["top_k"] = top_k
        return task, validate_cells(data["inputs"]), kwargs

    if task == "describe":
        generation = ("do_sample", "temperature", "top_p", "num_beams", "repetition_penalty")
        _check_unknown(params, ("max_new_tokens", "prompt", *generation) + CELL_OPTIONS, task)
        kwargs = _cell_options(params)
        max_new_tokens = _int(params, "max_new_tokens", 1, MAX_NEW_TOKENS)
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        if params.get("prompt") is not None:
            prompt = params["prompt"]
            if not isinstance(prompt, str) or prompt.count("<cell>") != 1 or len(prompt) > MAX_TEXT_CHARS:
                raise RequestError("parameters.prompt must be a text with exactly one <cell> placeholder")
            kwargs["prompt"] = prompt
        generate_kwargs = {k: v for k, v in {
            "do_sample": _bool(params, "do_sample"),
            "temperature": _float(params, "temperature", 1e-3, 100.0),
            "top_p": _float(params, "top_p", 0.0, 1.0),
            "num_beams": _int(params, "num_beams", 1, 16),
            "repetition_penalty": _float(params, "repetition_penalty", 0.0, 100.0),
        }.items() if v is not None}
        if generate_kwargs:
            kwargs["generate_kwargs"] = generate_kwargs
        return task, validate_cells(data["inputs"]), kwargs

    _check_unknown(params, ("n_per_text", "seed", "genes", "noise_scale", "batch_size"), task)
    kwargs = {k: v for k, v in {
        "n_per_text": _int(params, "n_per_text", 1, MAX_PER_TEXT),
        "seed": _int(params, "seed", 0, 2**63 - 1),
        "noise_scale": _float(params, "noise_scale", 0.0, 100.0),
        "batch_size": _int(params, "batch_size", 1, MAX_BATCH_SIZE),
    }.items() if v is not None}
    if params.get("genes") is not None:
        kwargs["genes"] = _strings(params["genes"], "parameters.genes", MAX_GENES, distinct=True)
    texts = validate_texts(data["inputs"])
    n_cells = len(texts) * kwargs.get("n_per_text", 1)
    if n_cells > MAX_CELLS:
        raise RequestError(f"{len(texts)} texts × n_per_text is {n_cells} cells; at most {MAX_CELLS} per request")
    return task, texts, kwargs


# ---------------------------------------------------------------------------------------------------- handler
class EndpointHandler:
    """Loads the model, its processor and its pipelines once from `path`; `__call__(data)` answers one request."""

    def __init__(self, path: str = ""):
        path = path or "."
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        architectures = config.architectures or []
        auto = AutoModelForCausalLM if "ScMMGPTForConditionalGeneration" in architectures else AutoModel
        self.model = auto.from_pretrained(path, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self.pipelines = {}
        for task, info in (getattr(config, "custom_pipelines", None) or {}).items():
            pipeline_class = get_class_from_dynamic_module(info["impl"], path)
            self.pipelines[task] = pipeline_class(model=self.model, processor=self.processor, task=task)
        if not self.pipelines:
            raise ValueError(f"{path} declares no scMMGPT pipelines (config.json custom_pipelines); push it with "
                             "`scmmgpt push`, which adds them")

    def __call__(self, data):
        try:
            task, inputs, kwargs = validate_request(data)
            name = TASKS[task]
            if name not in self.pipelines:
                raise RequestError(f"this model does not support task {task!r} (supported: "
                                   f"{sorted(t for t, n in TASKS.items() if n in self.pipelines)})")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outputs = self.pipelines[name](inputs, **kwargs)
            for warning in caught:
                logger.warning("%s: %s", task, warning.message)
            return outputs
        except (RequestError, ValueError, TypeError, KeyError, FileNotFoundError) as error:
            return {"error": str(error) if not isinstance(error, KeyError) else f"missing {error}"}
        except Exception as error:  # an endpoint must answer every request; the log keeps the traceback
            logger.exception("scMMGPT request failed")
            return {"error": f"internal error ({type(error).__name__}): {error}"}
