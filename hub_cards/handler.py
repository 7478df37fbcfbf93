"""Inference Endpoints handler for scMMGPT (a custom handler: `handler.py` at the root of the model repository).

Requests (JSON):

    {"inputs": {"genes": ["LYZ", "MS4A1", ...], "counts": [[40, 0, ...], ...], "cell_ids": [...]},   # cells × genes
     "task": "annotate" | "describe" | "generate",
     "parameters": {...}}

- `annotate`: `parameters.labels` (default: the cell types the model was trained on), `method` (`retrieval` |
  `likelihood` | `generate`), `label_texts`, `top_k`, `batch_size`, `normalize` → one `{"cell", "label", "score",
  "top_labels"}` per cell;
- `describe`: `max_new_tokens`, `prompt`, `do_sample`, `temperature`, `top_p`, `num_beams`, `repetition_penalty`,
  `batch_size`, ... → one `{"cell", "generated_text"}` per cell;
- `generate`: `inputs` is `{"texts": [...]}` (or a text, or a list of texts); `n_per_text`, `seed`, `genes`,
  `state_spread`, `noise_scale`, `batch_size` → `{"gene_names": [...], "cells": [{"text", "expression"}, ...]}`.

A request that is malformed, too large or refused by the model gets `{"error": "..."}` naming the problem; the handler
never raises on a request. It checks only the endpoint's own limits: the values are checked by the pipelines' jobs
(`jobs_scmmgpt`), with the same messages as the Python API and the CLI. The model code comes from the repository itself (`trust_remote_code`), so the endpoint
needs only `requirements.txt`, not the scMMGPT package.
"""

import json
import logging
import math
import os
import warnings

import transformers
from transformers import AutoConfig, AutoFeatureExtractor, AutoProcessor
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


def _check_unknown(params, allowed, task):
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise RequestError(f"unknown parameters for task {task!r}: {unknown}; allowed: {sorted(allowed)}")


def _size(value) -> int:
    return len(value) if isinstance(value, (list, tuple)) else 0


def check_cells(inputs) -> dict:
    """The endpoint's limits on a cells payload; its values are checked by the jobs' reader."""
    if not isinstance(inputs, dict):
        raise RequestError('"inputs" must be an object {"genes": [...], "counts": [[...], ...]} for this task')
    unknown = sorted(set(inputs) - {"genes", "counts", "cell_ids"})
    if unknown:
        raise RequestError(f'"inputs" has unknown keys {unknown}; expected "genes", "counts" and optionally "cell_ids"')
    n_cells, n_genes = _size(inputs.get("counts")), _size(inputs.get("genes"))
    if n_genes > MAX_GENES:
        raise RequestError(f'"inputs.genes" has {n_genes} genes; at most {MAX_GENES} per request')
    if n_cells > MAX_CELLS:
        raise RequestError(f'"inputs.counts" has {n_cells} cells; at most {MAX_CELLS} per request')
    if n_cells * n_genes > MAX_VALUES:
        raise RequestError(f"{n_cells} cells × {n_genes} genes is over the limit of {MAX_VALUES} values")
    return inputs


def check_texts(inputs):
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - {"texts", "text"})
        if unknown:
            raise RequestError(f'"inputs" has unknown keys {unknown}; expected "texts"')
        inputs = inputs.get("texts", inputs.get("text"))
    if _size(inputs) > MAX_TEXTS:
        raise RequestError(f'"inputs.texts" has {_size(inputs)} texts; at most {MAX_TEXTS} per request')
    if isinstance(inputs, (list, tuple)) and any(isinstance(t, str) and len(t) > MAX_TEXT_CHARS for t in inputs):
        raise RequestError(f"a text is longer than {MAX_TEXT_CHARS} characters")
    return inputs


CELL_OPTIONS = ("batch_size", "normalize")
GENERATION = ("do_sample", "temperature", "top_p", "num_beams", "repetition_penalty")


def _options(params, ranges: dict) -> dict:
    """The parameters checked against the endpoint's ranges (`name → (low, high, kind)`)."""
    checks = {"int": _int, "float": _float}
    out = {}
    for name, (low, high, kind) in ranges.items():
        value = _bool(params, name) if kind == "bool" else checks[kind](params, name, low, high)
        if value is not None:
            out[name] = value
    return out


def _parse(data) -> dict:
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
    if data.get("task", "annotate") not in TASKS:
        raise RequestError(f'"task" must be one of {sorted(TASKS)}, got {data.get("task")!r}')
    if "inputs" not in data:
        raise RequestError('the request has no "inputs"')
    if not isinstance(data.get("parameters") or {}, dict):
        raise RequestError('"parameters" must be an object')
    return data


def validate_request(data) -> tuple[str, object, dict]:
    """A request (dict, or JSON text / bytes) → (task, pipeline input, pipeline keyword arguments), within the
    endpoint's limits; the values themselves are checked by the pipeline's jobs, with the same messages as the
    Python API and the CLI."""
    data = _parse(data)
    task, params = data.get("task", "annotate"), dict(data.get("parameters") or {})
    cell_ranges = {"batch_size": (1, MAX_BATCH_SIZE, "int"), "normalize": (None, None, "bool")}
    if task == "annotate":
        _check_unknown(params, ("labels", "method", "label_texts", "top_k") + CELL_OPTIONS, task)
        kwargs = {k: params[k] for k in ("labels", "method", "label_texts") if params.get(k) is not None}
        kwargs.update(_options(params, {**cell_ranges, "top_k": (1, MAX_LABELS, "int")}))
        if _size(kwargs.get("labels")) > MAX_LABELS:
            raise RequestError(f"parameters.labels has more than {MAX_LABELS} labels")
        return task, check_cells(data["inputs"]), kwargs
    if task == "describe":
        _check_unknown(params, ("max_new_tokens", "prompt", *GENERATION) + CELL_OPTIONS, task)
        kwargs = _options(params, {**cell_ranges, "max_new_tokens": (1, MAX_NEW_TOKENS, "int")})
        if params.get("prompt") is not None:
            kwargs["prompt"] = params["prompt"]
        generate_kwargs = _options(params, {"do_sample": (None, None, "bool"), "temperature": (1e-3, 100.0, "float"),
                                            "top_p": (0.0, 1.0, "float"), "num_beams": (1, 16, "int"),
                                            "repetition_penalty": (0.0, 100.0, "float")})
        if generate_kwargs:
            kwargs["generate_kwargs"] = generate_kwargs
        return task, check_cells(data["inputs"]), kwargs
    _check_unknown(params, ("n_per_text", "seed", "genes", "state_spread", "noise_scale", "batch_size"), task)
    kwargs = _options(params, {"n_per_text": (1, MAX_PER_TEXT, "int"), "seed": (0, 2**63 - 1, "int"),
                               "state_spread": (0.0, 100.0, "float"), "noise_scale": (0.0, 100.0, "float"),
                               "batch_size": (1, MAX_BATCH_SIZE, "int")})
    if params.get("genes") is not None:
        kwargs["genes"] = params["genes"]
    texts = check_texts(data["inputs"])
    n_cells = max(_size(texts), 1) * kwargs.get("n_per_text", 1)
    if n_cells > MAX_CELLS:
        raise RequestError(f"{_size(texts)} texts × n_per_text is {n_cells} cells; at most {MAX_CELLS} per request")
    return task, texts, kwargs


# ---------------------------------------------------------------------------------------------------- handler
class EndpointHandler:
    """Loads the model, its processor and its pipelines once from `path`; `__call__(data)` answers one request."""

    def __init__(self, path: str = ""):
        path = path or "."
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        # the folder's own registry of kinds (remote code) decides which class loads it, as everywhere else
        kind = get_class_from_dynamic_module("jobs_scmmgpt.model_kind", path)(config)
        self.model = getattr(transformers, kind.auto_class).from_pretrained(path, trust_remote_code=True).eval()
        loader = AutoProcessor if kind.name in ("stage1", "stage2") else AutoFeatureExtractor
        self.processor = loader.from_pretrained(path, trust_remote_code=True)
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
