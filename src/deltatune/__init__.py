"""deltatune: parameter-efficient fine-tuning for transformers and PyTorch models, peft-compatible on disk."""

from .checkpoint import atomic_write_files
from .config import LayerConfig, PeftConfig, PeftType, TaskType
from .errors import AdapterLoadError, AdapterStateError, ConfigError, DeltatuneError, TargetError
from .layers import AdapterLayer, Delta, ModulesToSaveWrapper
from .methods.lora import LoraConfig
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterStateError",
    "ConfigError",
    "Delta",
    "DeltatuneError",
    "LayerConfig",
    "LoraConfig",
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TargetError",
    "TaskType",
    "atomic_write_files",
    "get_peft_model",
]
