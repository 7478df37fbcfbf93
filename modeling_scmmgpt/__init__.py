"""scMMGPT: one pre-trained model that reads and writes single cells and text.

Importing the package registers its classes with the transformers Auto classes (`register()`), so that
`AutoConfig` / `AutoModel` / `AutoFeatureExtractor` / `AutoProcessor` resolve scMMGPT folders without
`trust_remote_code`. Saved folders also carry `auto_map` and the code, for loading where this package is not installed.
"""

from .configuration_scmmgpt import ScMMGPTCellConfig, ScMMGPTConfig
from .feature_extraction_scmmgpt import ScMMGPTCellTokenizer
from .jobs_scmmgpt import MODEL_KINDS, CellAnnotation, GeneratedCells, ScMMGPTJobs, model_kind
from .modeling_cell_classification import ScMMGPTCellForClassification
from .modeling_cell_encoder import ScMMGPTCellModel, ScMMGPTCellPreTrainedModel
from .modeling_cell_pretraining import ScMMGPTCellForMaskedValuePrediction
from .modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTModel, ScMMGPTPreTrainedModel
from .pipeline_scmmgpt import CellAnnotationPipeline, CellDescriptionPipeline, TextToCellPipeline, save_pipelines
from .processing_scmmgpt import ScMMGPTProcessor

__version__ = "0.1.0"


def register() -> None:
    """Register scMMGPT with the transformers Auto classes (idempotent) and mark the classes for `auto_map` saving."""
    from transformers import (
        AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
        AutoModelForSequenceClassification, AutoProcessor,
    )

    AutoConfig.register(ScMMGPTCellConfig.model_type, ScMMGPTCellConfig, exist_ok=True)
    AutoConfig.register(ScMMGPTConfig.model_type, ScMMGPTConfig, exist_ok=True)
    AutoModel.register(ScMMGPTCellConfig, ScMMGPTCellModel, exist_ok=True)
    AutoModel.register(ScMMGPTConfig, ScMMGPTModel, exist_ok=True)
    # stage 0 (cell encoder pre-training): masked value prediction is the cell analogue of masked LM
    AutoModelForMaskedLM.register(ScMMGPTCellConfig, ScMMGPTCellForMaskedValuePrediction, exist_ok=True)
    # fine-tuned cell type annotation: a cell is a sequence of gene tokens with one label
    AutoModelForSequenceClassification.register(ScMMGPTCellConfig, ScMMGPTCellForClassification, exist_ok=True)
    AutoModelForCausalLM.register(ScMMGPTConfig, ScMMGPTForConditionalGeneration, exist_ok=True)
    AutoFeatureExtractor.register(ScMMGPTCellConfig, ScMMGPTCellTokenizer, exist_ok=True)
    AutoFeatureExtractor.register(ScMMGPTConfig, ScMMGPTCellTokenizer, exist_ok=True)
    AutoProcessor.register(ScMMGPTConfig, ScMMGPTProcessor, exist_ok=True)

    ScMMGPTCellConfig.register_for_auto_class()
    ScMMGPTConfig.register_for_auto_class()
    ScMMGPTCellModel.register_for_auto_class("AutoModel")
    ScMMGPTModel.register_for_auto_class("AutoModel")
    ScMMGPTCellForMaskedValuePrediction.register_for_auto_class("AutoModelForMaskedLM")
    ScMMGPTCellForClassification.register_for_auto_class("AutoModelForSequenceClassification")
    ScMMGPTForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
    ScMMGPTCellTokenizer.register_for_auto_class("AutoFeatureExtractor")
    ScMMGPTProcessor.register_for_auto_class("AutoProcessor")


register()

__all__ = [
    "ScMMGPTCellConfig",
    "ScMMGPTConfig",
    "ScMMGPTCellTokenizer",
    "ScMMGPTCellModel",
    "ScMMGPTCellPreTrainedModel",
    "ScMMGPTCellForMaskedValuePrediction",
    "ScMMGPTCellForClassification",
    "ScMMGPTProcessor",
    "ScMMGPTPreTrainedModel",
    "ScMMGPTModel",
    "ScMMGPTForConditionalGeneration",
    "ScMMGPTJobs",
    "MODEL_KINDS",
    "model_kind",
    "CellAnnotation",
    "GeneratedCells",
    "CellAnnotationPipeline",
    "CellDescriptionPipeline",
    "TextToCellPipeline",
    "save_pipelines",
    "register",
]
