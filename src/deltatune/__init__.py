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
from .config import LayerConfig, PeftConfig, PeftType, PromptLearningConfig, TaskType
from .errors import AdapterLoadError, AdapterStateError, ConfigError, DeltatuneError, RemoteCodeError, TargetError
from .files import atomic_write_files
from .functional import (
    get_layer_status,
    get_model_status,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from .layers import AdapterLayer, Delta, ModulesToSaveWrapper
from .methods.adalora import AdaLoraConfig
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import IA3Config
from .methods.ln_tuning import LNTuningConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoraConfig
from .methods.oft import OFTConfig
from .methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .methods.vera import VeraConfig
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
    "AdaLoraConfig",
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
    "BitFitConfig",
    "BottleneckConfig",
    "ConfigError",
    "Delta",
    "DeltatuneError",
    "IA3Config",
    "LNTuningConfig",
    "LayerConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "ModulesToSaveWrapper",
    "OFTConfig",
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
    "VeraConfig",
    "atomic_write_files",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
]
