"""deltatune: parameter-efficient fine-tuning for transformers and PyTorch models, peft-compatible on disk."""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .checkpoint import atomic_write_files
from .config import LayerConfig, PeftConfig, PeftType, TaskType
from .errors import AdapterLoadError, AdapterStateError, ConfigError, DeltatuneError, RemoteCodeError, TargetError
from .layers import AdapterLayer, Delta, ModulesToSaveWrapper
from .methods.lora import LoraConfig
from .methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
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
from .prompt import PromptLearningConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterStateError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
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
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "RemoteCodeError",
    "TargetError",
    "TaskType",
    "atomic_write_files",
    "get_peft_model",
]
