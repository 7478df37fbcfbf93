"""Which kind of saved scMMGPT folder a model is, and which jobs each kind can do: the one registry the jobs, the
pipelines, the CLI, the Hub cards and the endpoint handler read (`jobs_scmmgpt` re-exports it)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKind:
    """One kind of saved scMMGPT folder: which class loads it (`auto_class` over `config_class`, defined in `module`)
    and which jobs it can do."""

    name: str
    architecture: str
    config_class: str
    auto_class: str
    module: str
    jobs: tuple[str, ...]
    annotation_methods: tuple[str, ...] = ()


_KINDS = (
    ModelKind("stage2", "ScMMGPTForConditionalGeneration", "ScMMGPTConfig", "AutoModelForCausalLM", "modeling_scmmgpt",
              ("annotate", "describe", "embed", "generate_cells"), ("retrieval", "likelihood", "generate")),
    ModelKind("stage1", "ScMMGPTModel", "ScMMGPTConfig", "AutoModel", "modeling_scmmgpt", ("annotate", "embed"),
              ("retrieval",)),
    ModelKind("classifier", "ScMMGPTCellForClassification", "ScMMGPTCellConfig", "AutoModelForSequenceClassification",
              "modeling_cell_classification", ("annotate", "embed"), ("classifier",)),
    ModelKind("encoder", "ScMMGPTCellForMaskedValuePrediction", "ScMMGPTCellConfig", "AutoModelForMaskedLM",
              "modeling_cell_pretraining", ("embed",)),
    ModelKind("encoder", "ScMMGPTCellModel", "ScMMGPTCellConfig", "AutoModel", "modeling_cell_encoder", ("embed",)),
)
# architecture (as `config.json` names it) → its kind: the one place that decides what a folder is and can do
MODEL_KINDS = {kind.architecture: kind for kind in _KINDS}
JOB_NAMES = {"annotate": "cell type annotation", "describe": "cell descriptions", "embed": "cell embeddings",
             "generate_cells": "pseudo-cell generation"}


def model_kind(config) -> ModelKind:
    """The kind of a folder from its config (a `config.json` dict or a config object); ValueError for folders that
    are not scMMGPT's."""
    architectures = (config.get("architectures") if isinstance(config, dict) else config.architectures) or []
    for architecture in architectures:
        if architecture in MODEL_KINDS:
            return MODEL_KINDS[architecture]
    raise ValueError(f"the model's config names architectures {list(architectures)}, none of which is scMMGPT's "
                     f"({sorted(MODEL_KINDS)}); save the model with save_pretrained first")


def kind_of_model(model) -> ModelKind:
    """The kind of a loaded model (a PEFT wrapper reads as its base model); by class, as an unsaved model's config
    names no architecture yet."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return MODEL_KINDS.get(type(base).__name__) or model_kind(base.config)


def require_job(kind: ModelKind, job: str) -> None:
    """One-line ValueError when a model of `kind` cannot do `job`."""
    if job not in kind.jobs:
        able = [k.name for k in _KINDS if job in k.jobs]
        raise ValueError(f"{JOB_NAMES.get(job, job)} needs a {' or '.join(dict.fromkeys(able))} model; this is a "
                         f"{kind.name} model ({kind.architecture}), which does: {', '.join(kind.jobs)}")


__all__ = ["JOB_NAMES", "MODEL_KINDS", "ModelKind", "kind_of_model", "model_kind", "require_job"]
